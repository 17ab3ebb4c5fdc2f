"""Episodes to token ids, with the separator positions the methods edit or read.

The prompt is tokenized as one string (what the model would see), and separator positions are
found from character offsets rather than by tokenizing pieces separately: piecewise
tokenization changes merges and, for SentencePiece models, inserts spurious word-start marks.
Batches are left-padded so every row's answer position is the last column, which lets the
model compute logits for that column only.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .episodes import Episode, Example
from .errors import UsageError
from .templates import IV, Template

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedTokenizerBase


@dataclass
class EncodedPrompt:
    ids: list[int]
    sep_pos: list[int]  # token index ending each input->output separator; the query's is last
    sep_class: list[int]  # class of each demo separator; n_classes marks the query's
    label: int  # the query's class
    query_start: int  # index of the query's first token: ids[:query_start] are BOS + demonstrations
    options: list[list[int]] | None = None  # multiple choice: each option's continuation tokens
    answer: list[int] | None = None  # open vocabulary: the query's own answer's continuation tokens


@dataclass
class PromptBatch:
    """Left-padded rows; every position below is already shifted for the padding."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T], 0 at each row's first real token
    sep_rows: torch.Tensor  # [N] row of each separator (all rows' separators, flattened)
    sep_cols: torch.Tensor  # [N] column of each separator
    sep_class: torch.Tensor  # [N] class index, n_classes for query separators
    query_cols: torch.Tensor  # [B] column of each row's query separator (== T - 1)
    query_starts: torch.Tensor  # [B] column of each row's first query token
    labels: torch.Tensor  # [B]
    option_ids: torch.Tensor | None = None  # [B, C, Lo] multiple choice: option tokens, right-padded
    option_lens: torch.Tensor | None = None  # [B, C] tokens per option, 0 where a row has fewer options
    answer_ids: torch.Tensor | None = None  # [B, La] open vocabulary: each row's answer tokens, right-padded
    answer_lens: torch.Tensor | None = None  # [B] tokens of each row's answer

    def to(self, device: torch.device | str) -> PromptBatch:
        fields = {k: v for k, v in self.__dict__.items() if v is not None}
        if all(v.device == torch.device(device) for v in fields.values()):
            return self
        return PromptBatch(**move_packed(fields, device))


def move_packed(tensors: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The same tensors on `device`, moved in one copy: packed into one flat buffer, then viewed apart.

    A batch has about ten small index tensors; moved one by one to a GPU, each is its own blocking
    copy from pageable memory, during which the GPU idles (measured on an H100: 8 syncs, 0.6-0.8 ms
    a batch). Tensors of different dtypes are grouped, one copy per dtype.
    """
    out: dict[str, torch.Tensor] = {}
    for dtype in dict.fromkeys(t.dtype for t in tensors.values()):
        names = [k for k, t in tensors.items() if t.dtype == dtype]
        flat = torch.cat([tensors[k].reshape(-1) for k in names]).to(device)
        offset = 0
        for k in names:
            n = tensors[k].numel()
            out[k] = flat[offset : offset + n].view(tensors[k].shape)
            offset += n
    return {k: out[k] for k in tensors}


class PromptEncoder:
    """Tokenizes episodes in a template; owns BOS, truncation and the answers' tokens.

    Where the query ends is decided here, per tokenizer (see `templates`): the template's answer
    context (`Template.answer_context`, e.g. '\\nSentiment:') always ends it; the delimiter's trailing
    spaces end it too when this tokenizer makes a space a token of its own, and otherwise begin the
    answer (' positive'). Labels are tokenized after that context, as they follow the prompt.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        label_words: list[str],
        add_bos: bool | str,
        max_example_tokens: int = 256,
        template: Template = IV,
        n_classes: int | None = None,
        strip: bool = True,
        pieces: bool = False,
    ) -> None:
        self.tok = tokenizer
        self.pieces = pieces  # each piece of a prompt tokenized on its own (--tokenize pieces)
        self.template = template
        self.label_words = label_words
        # the demonstrations' classes; an open-vocabulary task has one ("the answer") and no label words
        self.n_classes = len(label_words) if n_classes is None else n_classes
        self.bos = self._first_tokens(tokenizer, add_bos)
        self.strip = strip  # False: an input's trailing whitespace stays (verbatim inputs)
        self.max_example_tokens = max_example_tokens
        self.anchor = template.answer_context
        self._around = template.context("\0").split("\0")  # an input's fixed text before and after its text
        self.kept_space = self._kept_space(label_words or ["answer"])  # the delimiter's spaces in the prompt
        self.answer_space = template.answer_space[len(self.kept_space) :]  # ...and those that begin the answer
        self.label_tokens = [self._continuation(w, "label word") for w in label_words]  # empty for multiple choice
        self.label_ids = [t[0] for t in self.label_tokens]
        self._label_len = max(
            (
                len(self._tokenize(self.anchor + self.kept_space + self.answer_space + w)["input_ids"])
                for w in label_words
            ),
            default=0,
        )
        self._head_len = len(self._tokenize(template.head)["input_ids"]) if template.head else 0
        if max_example_tokens <= self._label_len + self._head_len + 1:
            raise UsageError(
                f"--max-example-tokens {max_example_tokens} leaves no room for the input; "
                f"accepted: > {self._label_len + self._head_len + 1}"
            )
        self._trunc_cache: dict[str, str] = {}

    @staticmethod
    def _first_tokens(tokenizer: PreTrainedTokenizerBase, add_bos: bool | str) -> list[int]:
        """The ids a prompt begins with: the BOS when `add_bos` (and the tokenizer has one), or with
        "tokenizer" whatever the tokenizer's own call puts before a text (a release's tokenizer(prompt))."""
        if add_bos == "tokenizer":
            probe = "a"
            bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
            full = tokenizer(probe)["input_ids"]
            start = next((i for i in range(len(full)) if full[i : i + len(bare)] == bare), 0)
            return list(full[:start])
        return [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []

    def _tokenize(self, text: str) -> BatchEncoding:
        encoded: BatchEncoding = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return encoded

    def _kept_space(self, words: list[str]) -> str:
        """The delimiter's trailing spaces that stay in the prompt: all of them when this tokenizer
        makes them tokens of their own before every probe word (the model then predicts the word
        after them), none when it writes a word with its leading space (' positive', one token: the
        space is the answer's, and a prompt ending in a space would be a token the model never saw)."""
        space = self.template.answer_space
        if not space or self.template.keep_space:
            return space
        start = len(self.anchor) + len(space)  # where the word begins
        for word in words:
            offsets = self._tokenize(self.anchor + space + word)["offset_mapping"]
            if not any(s >= len(self.anchor) and e <= start for s, e in offsets):
                return ""
        return space

    def _continuation(self, text: str, what: str = "answer option") -> list[int]:
        """Tokens of `text` as they follow the prompt: tokenized after the answer context, as the model
        sees them in a demonstration. Where the tokenizer would merge the prompt's last characters into
        the answer (a prompt ending in a space, `keep_space`, before a BPE word), the query's prompt
        still ends there, so the answer is what follows it: the text tokenized alone (StaICC's labels);
        elsewhere such a merge is refused, since the prompt's last token would then be one the
        demonstrations never show."""
        if self.pieces:  # the answer is a piece of its own: tokenized alone, as in every prompt
            alone = list(self._tokenize(self.answer_space + text)["input_ids"])
            if not alone:
                raise UsageError(f"{what} {text!r} produces no token")
            return alone
        context = self.anchor + self.kept_space
        enc = self._tokenize(context + self.answer_space + text)
        ids, starts = [], []
        for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            if end > len(context):
                ids.append(tid)
                starts.append(start)
        if ids and starts[0] < len(context) and self.template.keep_space:
            ids = list(self._tokenize(self.answer_space + text)["input_ids"])
        elif ids and starts[0] < len(context):
            raise UsageError(
                f"the tokenizer merges the end of the prompt {context!r} into the {what} {text!r}; "
                f"accepted: a template whose delimiter ends where this tokenizer starts a token (e.g. a newline)"
            )
        if not ids:
            raise UsageError(f"{what} {text!r} produces no token")
        return ids

    def check_label_collisions(self) -> None:
        """Two labels with one first token make one class unwinnable when only first tokens are compared:
        refuse rather than mis-score (--score full compares whole labels and accepts them)."""
        seen: dict[int, str] = {}
        for word, tid in zip(self.label_words, self.label_ids):
            if tid in seen:
                piece = self.tok.convert_ids_to_tokens(tid)
                raise UsageError(
                    f"labels '{seen[tid]}' and '{word}' share their first token {piece!r}; "
                    "give distinct label_words in the task config, or score whole labels with --score full"
                )
            seen[tid] = word

    def truncate(self, text: str) -> str:
        """Cut an input so the example (template text, input, answer) fits `max_example_tokens`."""
        text = text.rstrip() if self.strip else text
        cached = self._trunc_cache.get(text)
        if cached is not None:
            return cached
        budget = self.max_example_tokens - self._label_len - self._head_len
        enc = self._tokenize(text)
        out = text if len(enc["input_ids"]) <= budget else text[: enc["offset_mapping"][budget - 1][1]].rstrip()
        self._trunc_cache[text] = out
        return out

    def query_context(self, example: Example) -> str:
        """An example written up to its answer position (the query's whole text)."""
        return "".join(self.context_pieces(example))

    def demonstration(self, example: Example) -> str:
        """An example written whole: its context, its answer and the separator after it."""
        return "".join(self.demonstration_pieces(example))

    def context_pieces(self, example: Example) -> list[str]:
        """The query's text as pieces (the input's fixed head, its text, the fixed text up to the answer):
        what --tokenize pieces tokenizes one by one. Empty pieces are kept (they give no token)."""
        head, tail = self._around
        return [head, self.truncate(example.text), tail + self.kept_space]

    def demonstration_pieces(self, example: Example) -> list[str]:
        """A demonstration's pieces: its context's, its answer, the separator after it."""
        return [*self.context_pieces(example), *self._answer_pieces(example)]

    def _answer_pieces(self, example: Example) -> list[str]:
        """What follows a demonstration's context: its answer, then the separator."""
        return [self.answer_space + self.answer_text(example), self.template.separator]

    def _tokenize_pieces(self, pieces: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of the pieces written one after another: one call on their whole text,
        or (--tokenize pieces) one call per piece, each piece's offsets moved to where it stands."""
        if not self.pieces:
            enc = self._tokenize("".join(pieces))
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        start = 0
        for piece in pieces:
            if piece:
                enc = self._tokenize(piece)
                ids.extend(enc["input_ids"])
                offsets.extend((start + s, start + e) for s, e in enc["offset_mapping"])
            start += len(piece)
        return ids, offsets

    def encode(self, episode: Episode) -> EncodedPrompt:
        parts: list[str] = [self.template.preamble]  # the prompt's pieces (see `_tokenize_pieces`)
        sep_chars: list[int] = []  # char index of the last char before each answer (the answer position's)
        sep_class: list[int] = []
        length = len(self.template.preamble)
        for demo in episode.demos:
            context = self.context_pieces(demo)
            sep_chars.append(length + sum(map(len, context)) - 1)
            sep_class.append(demo.label)
            pieces = [*context, *self._answer_pieces(demo)]
            parts.extend(pieces)
            length += sum(map(len, pieces))
        query_char = length
        pieces = self.context_pieces(episode.query)
        sep_chars.append(length + sum(map(len, pieces)) - 1)
        sep_class.append(self.n_classes)
        parts.extend(pieces)
        text_ids, offsets = self._tokenize_pieces(parts)
        ends = [end for _, end in offsets]
        sep_pos = [_answer_position(ends, c) + len(self.bos) for c in sep_chars]
        ids = self.bos + text_ids
        if sep_pos[-1] != len(ids) - 1:
            raise UsageError("the tokenizer merges the query's trailing separator; this tokenizer is not supported")
        if any(a >= b for a, b in zip(sep_pos, sep_pos[1:])):  # the hooks edit each position once
            raise UsageError("the tokenizer merges two separators into one token; this tokenizer is not supported")
        options = None
        if episode.query.options is not None:
            # an option is an answer, not an input: cut at its end under either --inputs
            options = [self._continuation(self.truncate(o.rstrip())) for o in episode.query.options]
        answer = None if episode.query.answer is None else self._continuation(episode.query.answer, "answer")
        return EncodedPrompt(
            ids,
            sep_pos,
            sep_class,
            episode.query.label,
            _token_boundary(offsets, query_char) + len(self.bos),
            options,
            answer,
        )

    def answer_text(self, example: Example) -> str:
        """What follows a demonstration's separator: its label word, its correct option, or its answer."""
        if example.answer is not None:
            return example.answer
        return self.label_words[example.label] if example.options is None else example.options[example.label]


def _answer_position(ends: list[int], char: int) -> int:
    """The token that predicts what follows char `char` (the last of an answer context): the token
    holding it (the first whose end offset exceeds it), or the one before when that token runs on into
    the answer (a BPE word that took a demonstration's kept space, ' good'): reading or editing it would
    read the answer itself."""
    i = bisect.bisect_right(ends, char)
    return i - 1 if i > 0 and i < len(ends) and ends[i] > char + 1 else i


def _token_boundary(offsets: list[tuple[int, int]], char: int) -> int:
    """Index of the first token starting at or after `char`; refuses a token straddling it.

    Methods that encode the demonstrations apart from the query (DT's tuned cache) need the
    whole-prompt tokens to split exactly there, so that step 1 is the same tokens as plain ICL.
    """
    for i, (start, end) in enumerate(offsets):
        if start >= char:
            return i
        if end > char:
            raise UsageError(
                "the tokenizer merges the last demonstration into the query; this tokenizer is not supported"
            )
    return len(offsets)


def collate(prompts: list[EncodedPrompt], pad_id: int) -> PromptBatch:
    """Left-pad a list of prompts into one batch."""
    width = max(len(p.ids) for p in prompts)
    b = len(prompts)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    classes: list[int] = []
    starts: list[int] = []
    for r, p in enumerate(prompts):
        pad = width - len(p.ids)
        starts.append(p.query_start + pad)
        input_ids[r, pad:] = torch.tensor(p.ids, dtype=torch.long)
        mask[r, pad:] = 1
        rows.extend([r] * len(p.sep_pos))
        cols.extend(pos + pad for pos in p.sep_pos)
        classes.extend(p.sep_class)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        sep_rows=torch.tensor(rows, dtype=torch.long),
        sep_cols=torch.tensor(cols, dtype=torch.long),
        sep_class=torch.tensor(classes, dtype=torch.long),
        query_cols=torch.full((b,), width - 1, dtype=torch.long),
        query_starts=torch.tensor(starts, dtype=torch.long),
        labels=torch.tensor([p.label for p in prompts], dtype=torch.long),
        **(_collate_options(prompts, pad_id) if prompts[0].options is not None else {}),
        **(_collate_answers(prompts, pad_id) if prompts[0].answer is not None else {}),
    )


def _collate_answers(prompts: list[EncodedPrompt], pad_id: int) -> dict[str, torch.Tensor]:
    answers = [p.answer or [] for p in prompts]
    ids = torch.full((len(prompts), max(len(a) for a in answers)), pad_id, dtype=torch.long)
    for r, a in enumerate(answers):
        ids[r, : len(a)] = torch.tensor(a, dtype=torch.long)
    return {"answer_ids": ids, "answer_lens": torch.tensor([len(a) for a in answers], dtype=torch.long)}


def _options(prompts: list[EncodedPrompt]) -> list[list[list[int]]]:
    """Each prompt's option tokens (multiple-choice prompts only)."""
    out = []
    for p in prompts:
        assert p.options is not None, "a multiple-choice prompt has options"
        out.append(p.options)
    return out


def _collate_options(prompts: list[EncodedPrompt], pad_id: int) -> dict[str, torch.Tensor]:
    options = _options(prompts)
    n_opt = max(len(opts) for opts in options)
    width = max(len(o) for opts in options for o in opts)
    ids = torch.full((len(prompts), n_opt, width), pad_id, dtype=torch.long)
    lens = torch.zeros((len(prompts), n_opt), dtype=torch.long)
    for r, opts in enumerate(options):
        for j, o in enumerate(opts):
            ids[r, j, : len(o)] = torch.tensor(o, dtype=torch.long)
            lens[r, j] = len(o)
    return {"option_ids": ids, "option_lens": lens}


def option_lengths(prompts: list[EncodedPrompt]) -> torch.Tensor:
    """[N, C] tokens per option (0 where a prompt has fewer options), for length-normalised scores."""
    options = _options(prompts)
    n_opt = max(len(opts) for opts in options)
    return torch.tensor([[len(o) for o in opts] + [0] * (n_opt - len(opts)) for opts in options])


def length_order(prompts: list[EncodedPrompt]) -> list[int]:
    """Prompt indices, shortest first (ties in input order): padding is wasted compute, so batch neighbours in length."""
    return sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))


def length_sorted_batches(prompts: list[EncodedPrompt], batch_size: int) -> list[list[int]]:
    """Index groups of similar length (consecutive chunks of `length_order`)."""
    order = length_order(prompts)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def split_prefix(prompts: list[EncodedPrompt]) -> tuple[EncodedPrompt, list[EncodedPrompt], list[int]]:
    """Prompts that share their demonstrations (`--demos fixed`) cut into the shared prefix (BOS +
    demonstrations, with their separators), each prompt's query part (its own separator and options,
    positions from 0) and the indices of prompts whose tokens before the query differ from the first's.

    The parts are cut from each whole prompt's tokens, never tokenized apart, so prefix + query is
    token for token the whole prompt; a tokenizer that splits the demonstrations differently before
    some query (a query starting with a space, say) leaves those prompts to be scored whole.
    """
    first = prompts[0]
    cut = first.query_start
    prefix = EncodedPrompt(first.ids[:cut], first.sep_pos[:-1], first.sep_class[:-1], -1, cut)
    queries, differ = [], []
    for i, p in enumerate(prompts):
        start = p.query_start
        if p.ids[:start] != prefix.ids or p.sep_pos[:-1] != prefix.sep_pos:
            differ.append(i)
        queries.append(
            EncodedPrompt(p.ids[start:], [p.sep_pos[-1] - start], p.sep_class[-1:], p.label, 0, p.options, p.answer)
        )
    return prefix, queries, differ


def split_demos(batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut left-padded whole prompts into left-padded demonstrations and the query part.

    Returns demo ids and mask [B, Ld], query ids and mask [B, Lq] (query rows left-padded too,
    so the pads sit between demos and query, masked out) and each row's demo length [B].
    """
    ids, mask, starts = batch.input_ids, batch.attention_mask, batch.query_starts
    width = ids.shape[1]
    n_demo = starts - (width - mask.sum(dim=1))  # [B] real demo tokens per row
    if int(n_demo.min()) < 1:
        raise UsageError("these prompts have no demonstrations to cut; accepted: --shot 1 or more")
    demo_w = int(n_demo.max())
    src = starts[:, None] - demo_w + torch.arange(demo_w, device=ids.device)  # [B, Ld] source columns
    demo_mask = (src >= starts[:, None] - n_demo[:, None]).long()
    demo_ids = torch.where(demo_mask.bool(), ids.gather(1, src.clamp(min=0)), ids[:, :1])
    query_w = width - int(starts.min())
    cols = torch.arange(width - query_w, width, device=ids.device)
    query_mask = (cols[None, :] >= starts[:, None]).long()  # [B, Lq]
    return demo_ids, demo_mask, ids[:, width - query_w :], query_mask, n_demo
