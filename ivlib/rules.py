"""Scoring rules: how the model's output at the answer position becomes a row of answer scores, and
that row a prediction.

Each paper judges a query its own way, and a number measured by another rule is not the paper's:
- `first-token`: argmax over each label's first token (the IV release, ivlib's default);
- `full`: the log-probability of each label's whole continuation, summed (lm-evaluation-harness, DT);
  `full-mean` takes the per-token mean instead; both are recorded, the headline by the rule;
- `vocab`: top-1 over the whole vocabulary; right only if it is the gold label's first token
  (Function Vectors, Task Vectors, State Vector);
- `generate`: greedy decoding, the text cut where the template's separator would begin, exact match
  after stripping whitespace (SITE).
Under `vocab` and `generate` the model may answer none of the labels: that prediction is
`n_classes` ("none"), wrong for every class, which F1 and accuracy count as a miss.

A rule returns one float row per prompt, laid out by the rule (`Rule.width`), so the batched loop,
data parallel and the samples log carry it like any score tensor. Continuations (`full`) and decoding
steps (`generate`) run over the prompt's cache with the methods' position edits paused
(`hooks.prompt_edits_paused`): an edit belongs to the prompt's positions, not to the answer's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import UsageError
from .protocol import LAST_TOKEN_RULES, RULES

if TYPE_CHECKING:
    from .prompts import PromptBatch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Answers:
    """The labels as the model would write them after the prompt: their tokens and words."""

    words: tuple[str, ...]
    first: tuple[int, ...]  # each label's first token
    tokens: tuple[tuple[int, ...], ...] = ()  # each label's whole continuation (empty for multiple choice)


@dataclass
class Rule:
    """A scoring rule; `name` is one of RULES."""

    name: str
    answers: Answers
    max_new_tokens: int = 0  # generate: tokens decoded at most
    stop: str = "\n"  # generate: where a decoded answer ends
    tokenizer: Any = field(default=None, repr=False)  # generate: decodes the answer
    eos: int | None = None

    @property
    def n(self) -> int:
        return len(self.answers.first) or len(self.answers.words)

    @property
    def needs_cache(self) -> bool:
        """Whether scoring runs past the answer position (over the prompt's cache)."""
        return self.name in ("full", "full-mean", "generate")

    @property
    def last_token(self) -> bool:
        return self.name in LAST_TOKEN_RULES

    @property
    def can_say_none(self) -> bool:
        """Whether a prediction may be none of the answers (`n` then stands for it)."""
        return self.name in ("vocab", "generate")

    def width(self, n_answers: int) -> int:
        """Columns of a score row: C answers; vocab: + the best other token's log-prob and id;
        generate: + none, + the decoded token ids."""
        extra = {"vocab": 2, "generate": 1 + self.max_new_tokens}.get(self.name, 0)
        return n_answers + extra

    def score_columns(self, n_answers: int) -> int:
        """The columns that are scores (what a samples log shows): without the token ids."""
        return n_answers + (1 if self.can_say_none else 0)

    # ---- rows of scores --------------------------------------------------------------------------
    def from_logits(self, logits: torch.Tensor, gold: torch.Tensor | None = None) -> torch.Tensor:
        """[N, V] answer-position logits -> [N, W] rows, for rules that need nothing else. `gold` [N]:
        an open-vocabulary task's own answer per row (its first token), its one "label" column."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if gold is not None:
            first = gold.to(logprobs.device)[:, None]  # [N, 1]
            labels = logprobs.gather(1, first)
            others = logprobs.scatter(1, first, NEG_INF)
        else:
            ids = torch.tensor(self.answers.first, dtype=torch.long, device=logprobs.device)
            labels = logprobs[:, ids]  # [N, C]
            others = logprobs.index_fill(1, ids, NEG_INF) if self.name == "vocab" else logprobs
        if self.name != "vocab":
            return labels
        best, best_id = others.max(dim=-1)  # the best token that starts no label
        return torch.cat([labels, best[:, None], best_id[:, None].float()], dim=1)

    def choices(self, scores: torch.Tensor, lengths: torch.Tensor | None = None) -> np.ndarray:
        """[N, W] rows -> [N] predictions in 0..C (C: none of them, under vocab and generate).

        `lengths` [N, C] (tokens per answer) turn summed log-probs into per-token means: `full-mean`,
        and multiple choice's default."""
        c = scores.shape[1] - self.width(0)
        head = scores[:, : self.score_columns(c)]
        if self.name == "full-mean" and lengths is not None:
            head = head / lengths.clamp(min=1)
        return head.argmax(dim=-1).numpy()

    def texts(self, scores: torch.Tensor, gold: list[int] | None = None) -> list[str] | None:
        """What the model answered, per row, for a samples log: the predicted token (vocab) or the
        decoded text (generate); None for rules that only rank the answers. `gold`: an open-vocabulary
        task's answers' first tokens, per row."""
        c = scores.shape[1] - self.width(0)
        if self.name == "vocab":
            picks = self.choices(scores)
            firsts = [[g] for g in gold] if gold is not None else [list(self.answers.first)] * len(picks)
            ids = [firsts[i][p] if p < c else int(scores[i, c + 1]) for i, p in enumerate(picks)]
            return [self.tokenizer.decode([t]) if self.tokenizer is not None else str(t) for t in ids]
        if self.name == "generate":
            return [self.decode(row[c + 1 :]) for row in scores]
        return None

    # ---- generate -----------------------------------------------------------------------------
    def _raw(self, ids: torch.Tensor) -> tuple[str, bool]:
        """(decoded text up to the first end-of-sequence or -1 pad, whether one was reached)."""
        kept: list[int] = []
        for t in ids.tolist():
            if t < 0 or t == self.eos:
                return self.tokenizer.decode(kept, skip_special_tokens=True), True
            kept.append(int(t))
        return self.tokenizer.decode(kept, skip_special_tokens=True), False

    def decode(self, ids: torch.Tensor) -> str:
        """The answer a row of decoded ids gives: cut where it ends (the stop text), stripped."""
        return self._raw(ids)[0].split(self.stop, 1)[0].strip()

    def ended(self, ids: torch.Tensor) -> bool:
        """Whether decoding this row further could change its answer: it reached the end of sequence
        or the stop text."""
        text, eos = self._raw(ids)
        return eos or self.stop in text

    def matches(self, tokens: torch.Tensor, gold: list[str] | None = None) -> torch.Tensor:
        """[B, N] decoded ids -> [B, C + 1]: 0 at the label the text equals (or at none), -inf elsewhere.
        `gold`: an open-vocabulary task's answer per row, its one label."""
        out = torch.full((tokens.shape[0], 1 + (1 if gold is not None else len(self.answers.words))), NEG_INF)
        for row, ids in enumerate(tokens.cpu()):
            words = [gold[row].strip()] if gold is not None else [w.strip() for w in self.answers.words]
            text = self.decode(ids)
            out[row, words.index(text) if text in words else len(words)] = 0.0
        return out

    def gold_texts(self, answer_ids: torch.Tensor, answer_lens: torch.Tensor) -> list[str]:
        """An open-vocabulary batch's answers as text (what a decoded answer must equal)."""
        return [
            self.tokenizer.decode(ids[: int(n)].tolist(), skip_special_tokens=True).strip()
            for ids, n in zip(answer_ids.cpu(), answer_lens.cpu())
        ]


def make_rule(name: str, answers: Answers, tokenizer: Any, stop: str, max_new_tokens: int | None) -> Rule:
    """A rule for a task's answers; `max_new_tokens` (generate) defaults to the longest label's tokens + 2,
    enough to see the label and where it ends."""
    if name not in RULES:
        raise UsageError(f"--score '{name}' is unknown; accepted: {', '.join(RULES)}")
    longest = max((len(t) for t in answers.tokens), default=1)
    n_new = max_new_tokens if max_new_tokens is not None else longest + 2
    return Rule(name, answers, n_new if name == "generate" else 0, stop, tokenizer, tokenizer.eos_token_id)


def option_tokens(answers: Answers, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels' continuations as every row's options: ids [rows, C, Lo] (right-padded) and lengths
    [rows, C], views of one [C, Lo] table, so `full` runs the multiple-choice machinery."""
    width = max(len(t) for t in answers.tokens)
    ids = torch.zeros(len(answers.tokens), width, dtype=torch.long)
    for j, t in enumerate(answers.tokens):
        ids[j, : len(t)] = torch.tensor(t, dtype=torch.long)
    lens = torch.tensor([len(t) for t in answers.tokens], dtype=torch.long)
    return ids.to(device).expand(rows, -1, -1), lens.to(device).expand(rows, -1)


def with_label_options(batch: PromptBatch, answers: Answers) -> tuple[torch.Tensor, torch.Tensor]:
    """(option ids, lengths) of a batch: its own options (multiple choice) or the labels' continuations."""
    if batch.option_ids is not None:
        assert batch.option_lens is not None
        return batch.option_ids, batch.option_lens
    return option_tokens(answers, batch.input_ids.shape[0], batch.input_ids.device)
