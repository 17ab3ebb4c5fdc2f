"""Each scoring rule (--score) against a plain loop that scores one prompt at a time."""

from __future__ import annotations

import pytest
import torch
from bpe import bpe_model
from conftest import wrap

from ivlib import api
from ivlib.episodes import sample_episodes, with_demos
from ivlib.experiment import make_scorer, score_prompts
from ivlib.methods.icl import ICL
from ivlib.methods.iv import IterativeVectors
from ivlib.prompts import PromptEncoder
from ivlib.protocol import Protocol
from ivlib.templates import BUILTIN

# multi-token labels: the tiny tokenizer spells words it does not know letter by letter
WORDS = ["fab", "meh", "so-so"]
TEXTS = [f"review number {i} says {w} things" for i in range(30) for w in ("good", "bad", "fine")]


@pytest.fixture(scope="module")
def task():
    labels = [i % 3 for i in range(len(TEXTS))]
    return api.task_from_lists(WORDS, (TEXTS, labels), name="three")


@pytest.fixture(scope="module", params=["gpt2", "llama", "bpe"])
def model(request):
    return bpe_model() if request.param == "bpe" else wrap(request.param)


def _setup(model, task, rule, template="iv", shot=1, n=7, max_new_tokens=None):
    protocol = Protocol.build(shot=shot, score=rule, template=template, max_new_tokens=max_new_tokens)
    encoder = PromptEncoder(model.tokenizer, task.label_words, True, 256, protocol.template)
    scorer = make_scorer(model, task, encoder, 4, True, protocol)
    episodes = sample_episodes(task.splits["validation"], 3, shot, n, 5, "v")
    return encoder, scorer, [encoder.encode(e) for e in episodes]


@torch.no_grad()
def _logprobs(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("template", ["iv", "dt/sst2", "staicc/sst2"])
def test_full_equals_summed_token_logprobs_one_prompt_at_a_time(model, task, template):
    encoder, scorer, prompts = _setup(model, task, "full", template)
    assert max(len(t) for t in encoder.label_tokens) > 1  # the continuation really runs
    got = scorer.runner.map(prompts, lambda b: ICL().predict(scorer, b), "t")  # [N, C] summed log-probs
    for row, p in enumerate(prompts):
        for c, tokens in enumerate(encoder.label_tokens):
            logprobs = _logprobs(model, p.ids + tokens)
            want = sum(float(logprobs[len(p.ids) - 1 + j, t]) for j, t in enumerate(tokens))
            assert got[row, c].item() == pytest.approx(want, abs=1e-4)
    lengths = torch.tensor([len(t) for t in encoder.label_tokens], dtype=torch.float32)
    means = Protocol.build(score="full-mean")
    mean_scorer = make_scorer(model, task, encoder, 4, True, means)
    assert (mean_scorer.predictions(got, prompts) == (got / lengths).argmax(-1).numpy()).all()


def test_vocab_equals_a_plain_argmax_over_the_whole_vocabulary(model, task):
    encoder, scorer, prompts = _setup(model, task, "vocab", "fv")
    got = scorer.runner.map(prompts, lambda b: ICL().predict(scorer, b), "t")  # [N, C + 2]
    predictions = scorer.predictions(got, prompts)
    answers = scorer.rule.texts(got)
    for row, p in enumerate(prompts):
        best = int(_logprobs(model, p.ids)[-1].argmax())
        firsts = [t[0] for t in encoder.label_tokens]
        want = firsts.index(best) if best in firsts else len(firsts)
        assert predictions[row] == want
        assert answers[row] == model.tokenizer.decode([best])


@pytest.mark.parametrize("template", ["iv", "fv"])
def test_generate_equals_greedy_generate_one_prompt_at_a_time(model, task, template):
    encoder, scorer, prompts = _setup(model, task, "generate", template, max_new_tokens=5)
    got = scorer.runner.map(prompts, lambda b: ICL().predict(scorer, b), "t")  # [N, C + 1 + 5]
    texts = scorer.rule.texts(got)
    predictions = scorer.predictions(got, prompts)
    stop = BUILTIN[template].stop
    for row, p in enumerate(prompts):
        out = model.model.generate(
            torch.tensor([p.ids]),
            attention_mask=torch.ones(1, len(p.ids), dtype=torch.long),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
            eos_token_id=None,
        )[0, len(p.ids) :]
        want = model.tokenizer.decode(out.tolist(), skip_special_tokens=True).split(stop, 1)[0].strip()
        assert texts[row] == want
        assert predictions[row] == (WORDS.index(want) if want in WORDS else len(WORDS))


def test_generate_counts_an_exact_match_as_that_label(task):
    """A label the model writes is that label: the match is checked on the decoded text."""
    model = wrap("gpt2")
    ids = model.tokenizer(" so-so\nmore", add_special_tokens=False)["input_ids"]
    _, scorer, _ = _setup(model, task, "generate", max_new_tokens=len(ids))
    assert scorer.rule.matches(torch.tensor([ids])).argmax(dim=-1).item() == WORDS.index("so-so")
    cut = torch.tensor([ids[:3] + [-1] * (len(ids) - 3)])  # ' so' only: no label
    assert scorer.rule.matches(cut).argmax(dim=-1).item() == len(WORDS)


@pytest.mark.parametrize("rule", ["full", "vocab", "generate"])
def test_rules_under_fixed_demonstrations_equal_whole_prompts(task, rule):
    """The shared-prefix path (--demos fixed) scores each rule as the whole prompts would."""
    model = wrap("llama")
    encoder, scorer, prompts = _setup(model, task, rule, max_new_tokens=3)
    demos = sample_episodes(task.splits["train"], 3, 1, 1, 9, "d")[0].demos
    queries = sample_episodes(task.splits["validation"], 3, 0, 6, 5, "v")
    fixed = [encoder.encode(e) for e in with_demos(queries, demos)]
    whole = scorer.runner.map(fixed, lambda b: ICL().predict(scorer, b), "t")
    shared = score_prompts(ICL(), scorer, fixed, "t", fixed=True)
    width = scorer.rule.score_columns(3)
    torch.testing.assert_close(shared[:, :width], whole[:, :width], atol=1e-4, rtol=1e-4)
    assert (scorer.predictions(shared, fixed) == scorer.predictions(whole, fixed)).all()


@pytest.mark.parametrize("rule", ["full", "generate"])
def test_a_methods_edits_stay_on_the_prompt_while_the_answer_is_scored(task, rule):
    """IV's edits are the prompt's separators: the continuation (full) and the decoding steps
    (generate) run over the edited prompt's cache with no edit, as a plain loop does by hand."""
    model = wrap("gpt2")
    encoder, scorer, prompts = _setup(model, task, rule, max_new_tokens=3)
    iv = IterativeVectors(strength=3.0)
    iv.load_state({"vectors": torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0))})
    got = scorer.runner.map(prompts, lambda b: iv.predict(scorer, b), "t")
    plain = make_scorer(model, task, encoder, 1, True, Protocol.build(score=rule, max_new_tokens=3))
    for row, p in enumerate(prompts):  # one prompt: its edits by hand, then the answer over its cache
        batch = plain.batch([p])
        with iv.edit(model, batch).apply():
            logits, cache = plain.encode(batch.input_ids, batch.attention_mask, batch.position_ids)
        mask, nxt = batch.attention_mask, batch.position_ids[:, -1] + 1
        want = plain._answer_scores(logits, cache, mask, nxt, batch)  # no hook is installed here
        torch.testing.assert_close(got[row : row + 1], want, atol=1e-4, rtol=1e-4)
    unedited = scorer.runner.map(prompts, lambda b: ICL().predict(scorer, b), "t")
    assert not torch.allclose(got, unedited)  # the edit did change the prompt's scores


def test_none_predictions_count_as_misses_in_f1_and_accuracy():
    from ivlib.metrics import f1_scores

    y_true = [0, 1, 1, 0]
    y_pred = [0, 2, 1, 2]  # 2 = none of the two classes
    scores = f1_scores(y_true, y_pred, 2)
    assert scores["micro"] == 0.5  # accuracy
    # class 0: tp 1, predicted 1, true 2 -> F1 2/3; class 1: tp 1, predicted 1, true 2 -> 2/3
    assert scores["macro"] == pytest.approx(2 / 3)
