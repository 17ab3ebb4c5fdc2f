"""`--tokenize pieces`: a prompt tokenized piece by piece (the template's fixed text, the input, the
answer, the separator, each in its own call), as the IV release's Verbalizer does. Where a tokenizer
merges across a join (GPT-2-style BPE writes three newlines before a word as two tokens and one),
the ids differ from the whole prompt's, and --preset iv needs the release's own to give its answers."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ivlib.episodes import Episode, Example
from ivlib.errors import UsageError
from ivlib.presets import PRESETS
from ivlib.prompts import PromptEncoder
from ivlib.protocol import Protocol, marks

LINES = ["the food was great", "the soup was bland", "a fine show", "an awful film"]


def _bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE like SmolLM2's, trained on prompts: it merges runs of newlines."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"{a}\ngood\n\n\n{b}\nbad\n\n\n" for a in LINES for b in LINES] * 4
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<s>")


EPISODE = Episode([Example("the soup was bland", 0, index=0)], Example("the food was great", 1, index=1))


def _encoders() -> tuple[PromptEncoder, PromptEncoder]:
    tok = _bpe()
    return PromptEncoder(tok, ["bad", "good"], False), PromptEncoder(tok, ["bad", "good"], False, pieces=True)


def test_pieces_are_tokenized_one_by_one_and_the_whole_prompt_at_once():
    whole, pieces = _encoders()
    tok = whole.tok
    text = ["the soup was bland", "\n", "bad", "\n\n\n", "the food was great", "\n"]

    def ids(t: str) -> list[int]:
        return list(tok(t, add_special_tokens=False)["input_ids"])

    assert pieces.encode(EPISODE).ids == [i for t in text for i in ids(t)]  # a plain loop over the pieces
    assert whole.encode(EPISODE).ids == ids("".join(text))
    assert whole.encode(EPISODE).ids != pieces.encode(EPISODE).ids  # the tokenizer merges across "\n\n\n" + word
    assert tok.convert_ids_to_tokens(ids("\n\n\n")) == ["ĊĊĊ"]


def test_pieces_keep_the_separators_on_the_delimiter_and_the_labels_alone():
    _, pieces = _encoders()
    prompt = pieces.encode(EPISODE)
    tokens = pieces.tok.convert_ids_to_tokens(prompt.ids)
    assert [tokens[p] for p in prompt.sep_pos] == ["Ċ", "Ċ"] and prompt.sep_pos[-1] == len(prompt.ids) - 1
    assert prompt.sep_class == [0, 2] and tokens[prompt.query_start] == pieces.tok.tokenize("the")[0]
    assert pieces.label_ids == [pieces.tok(w, add_special_tokens=False)["input_ids"][0] for w in ("bad", "good")]


def test_the_default_is_the_whole_prompt_and_pieces_is_recorded_apart():
    assert Protocol().tokenize == "prompt" and Protocol().posing("classification") == {}
    posed = Protocol.build(tokenize="pieces")
    assert posed.posing("classification") == {"tokenize": "pieces"}
    assert marks({"tokenize": "pieces"}) == ["pieces"] and marks({"tokenize": "prompt"}) == []
    assert PRESETS["iv"].values["tokenize"] == "pieces"
    with pytest.raises(UsageError, match="tokenize 'words' is not accepted; accepted: prompt, pieces"):
        Protocol.build(tokenize="words")
