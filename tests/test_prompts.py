import pytest
import torch

from ivlib.episodes import Episode, Example
from ivlib.errors import UsageError
from ivlib.prompts import PromptEncoder, collate, move_packed
from ivlib.templates import IV

IO_SEP, EXAMPLE_SEP = IV.delimiter, IV.separator


def _episode():
    demos = (Example("The food was great.", 1), Example("The plot was dull.", 0))
    return Episode(demos, Example("The view was lovely.", 1))


def test_separator_positions_point_at_the_newline_before_each_answer(gpt2, task):
    enc = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    p = enc.encode(_episode())
    tok = gpt2.tokenizer
    assert p.ids[0] == tok.bos_token_id
    assert [tok.convert_ids_to_tokens(p.ids[i]) for i in p.sep_pos] == ["\n"] * 3
    # the token after a demo separator is that demo's label word, and the query's is the last token
    assert tok.convert_ids_to_tokens(p.ids[p.sep_pos[0] + 1]) == "good"
    assert tok.convert_ids_to_tokens(p.ids[p.sep_pos[1] + 1]) == "bad"
    assert p.sep_pos[-1] == len(p.ids) - 1
    assert p.sep_class == [1, 0, 2] and p.label == 1
    text = tok.decode(p.ids[1:])
    assert (
        text
        == "The food was great."
        + IO_SEP
        + "good"
        + EXAMPLE_SEP
        + "The plot was dull."
        + IO_SEP
        + "bad"
        + EXAMPLE_SEP
        + "The view was lovely."
        + IO_SEP
    )


def test_no_bos_when_not_asked(gpt2, task):
    p = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=False).encode(_episode())
    assert p.ids[0] != gpt2.tokenizer.bos_token_id


def test_truncation_keeps_separator_and_label(gpt2, task):
    enc = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=False, max_example_tokens=20)
    long = " ".join(["food"] * 200)
    p = enc.encode(Episode((Example(long, 0),), Example(long, 1)))
    first_example = p.ids[: p.sep_pos[0] + 2]  # input, separator, label
    assert len(first_example) <= 20
    assert gpt2.tokenizer.convert_ids_to_tokens(p.ids[p.sep_pos[0] + 1]) == "bad"
    assert p.sep_pos[-1] == len(p.ids) - 1


def test_label_first_tokens_and_collisions(gpt2):
    enc = PromptEncoder(gpt2.tokenizer, ["bad", "good"], add_bos=False)
    assert gpt2.tokenizer.convert_ids_to_tokens(enc.label_ids) == ["bad", "good"]
    clash = PromptEncoder(gpt2.tokenizer, ["xylo", "xenon"], add_bos=False)  # both start with 'x'
    with pytest.raises(UsageError, match="share their first token"):
        clash.check_label_collisions()


def test_collate_left_pads_and_shifts_positions(gpt2, task):
    enc = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    short = enc.encode(Episode((), Example("Good.", 1)))
    long = enc.encode(_episode())
    b = collate([short, long], pad_id=gpt2.tokenizer.pad_token_id)
    width = len(long.ids)
    pad = width - len(short.ids)
    assert b.input_ids.shape == (2, width)
    assert b.attention_mask[0, :pad].sum() == 0 and b.attention_mask[0, pad:].all()
    assert b.position_ids[0, pad].item() == 0 and b.position_ids[0, -1].item() == len(short.ids) - 1
    assert b.sep_rows.tolist() == [0, 1, 1, 1]
    assert b.sep_cols.tolist() == [short.sep_pos[0] + pad] + long.sep_pos
    assert (b.query_cols == width - 1).all()
    assert torch.equal(
        b.input_ids[b.sep_rows, b.sep_cols], torch.tensor([short.ids[-1]] + [long.ids[i] for i in long.sep_pos])
    )


def test_a_batch_moves_as_one_packed_copy_per_dtype(gpt2, task):
    """Moving a batch packs its index tensors into one buffer: each field comes back whole, with its
    shape, and fields are disjoint views (writing one leaves the others intact)."""
    enc = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    b = collate([enc.encode(Episode((), Example("Good.", 1))), enc.encode(_episode())], gpt2.tokenizer.pad_token_id)
    fields = {k: v for k, v in b.__dict__.items() if v is not None}
    fields["weights"] = torch.rand(3, 2)  # a second dtype gets its own buffer
    moved = move_packed(fields, "cpu")
    assert list(moved) == list(fields)
    for k, v in fields.items():
        assert moved[k].dtype == v.dtype and torch.equal(moved[k], v)
    assert moved["input_ids"].untyped_storage().data_ptr() == moved["labels"].untyped_storage().data_ptr()
    assert moved["weights"].untyped_storage().data_ptr() != moved["labels"].untyped_storage().data_ptr()
    moved["sep_cols"].zero_()
    assert torch.equal(moved["sep_rows"], fields["sep_rows"]) and torch.equal(moved["labels"], fields["labels"])
    assert b.to("cpu") is b  # already there: no copy at all


def test_a_tokenizer_that_merges_two_separators_is_refused(gpt2, task, monkeypatch):
    enc = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    real = enc._tokenize

    def merging(text):  # one token from the start through the second demonstration's separator
        out = real(text)
        if EXAMPLE_SEP not in text:  # truncation tokenizes single texts: leave those alone
            return out
        second_sep = text.index("The plot was dull.") + len("The plot was dull.")
        offsets = list(out["offset_mapping"])
        n = next(i for i, (_, e) in enumerate(offsets) if e > second_sep)
        return {
            "input_ids": [out["input_ids"][0]] + list(out["input_ids"][n + 1 :]),
            "offset_mapping": [(0, offsets[n][1])] + offsets[n + 1 :],
        }

    monkeypatch.setattr(enc, "_tokenize", merging)
    with pytest.raises(UsageError, match="merges two separators"):
        enc.encode(_episode())
