"""Open-vocabulary tasks (input -> any text): loaded from files, posed with k demonstrations, judged
over the whole vocabulary or by generation; every method that declares them runs; Hendel's Task
Vectors against a plain loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wrap

import ivlib
from ivlib.cli import main
from ivlib.episodes import sample_episodes
from ivlib.errors import UsageError
from ivlib.experiment import make_scorer, task_encoder
from ivlib.hooks import edit_outputs
from ivlib.methods import METHODS
from ivlib.methods.tv_hendel import HendelTaskVectors
from ivlib.protocol import Protocol
from ivlib.tasks import load_task
from ivlib.templates import IV

REPO = Path(__file__).resolve().parent.parent
WORDS = ["hot", "cold", "big", "small", "up", "down", "good", "bad", "new", "old", "fast", "slow"]
SUPPORTED = ["zero-shot", "icl", "tv", "tv-hendel", "fv", "dt", "sv", "site"]


def _pairs() -> list[dict[str, str]]:
    pairs = []
    for i in range(0, len(WORDS), 2):
        a, b = WORDS[i], WORDS[i + 1]
        for n in range(6):  # the same pair in several phrasings, so every split has some
            pairs += [{"input": f"{a}{n}", "output": f"{b}{n}"}, {"input": f"{b}{n}", "output": f"{a}{n}"}]
    return pairs


@pytest.fixture(scope="module")
def antonyms(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ov") / "antonym.json"
    path.write_text(json.dumps(_pairs()))
    return path


@pytest.fixture(scope="module")
def task(antonyms):
    return load_task("antonym", {"data_files": str(antonyms), "open_vocabulary": {}})


def _config(tmp: Path, antonyms: Path, extra: str = "") -> str:
    path = tmp / "ov.yaml"
    path.write_text(
        "models:\n  tiny-gpt2: {builtin: tiny-gpt2}\ntasks:\n"
        f"  antonym: {{data_files: {antonyms}, open_vocabulary: {{input: input, output: output}}{extra}}}\n"
    )
    return str(path)


def test_an_open_vocabulary_task_loads_with_an_answer_per_row(task):
    assert task.kind == "open_vocabulary" and task.label_words == [] and task.n_classes == 1
    assert task.provenance["carved"]["roles"] == ["validation", "test"]
    train = task.splits["train"]
    assert train.answers is not None and len(train.answers) == len(train.texts)
    assert {(t, a) for t, a in zip(train.texts, train.answers)} <= {(p["input"], p["output"]) for p in _pairs()}


def test_episodes_draw_k_demonstrations_from_the_pool_never_the_query(task):
    episodes = sample_episodes(task.splits["train"], 1, 3, 40, 7, "train/extract")
    for e in episodes:
        assert len(e.demos) == 3 and e.query.answer is not None  # k in all, not k per class
        assert e.query.text not in {d.text for d in e.demos}
        assert all(d.answer is not None and d.label == 0 for d in e.demos)
    again = sample_episodes(task.splits["train"], 1, 3, 40, 7, "train/extract")
    assert episodes == again  # seeded


def test_a_prompt_writes_each_demonstrations_answer_and_ends_at_the_querys(task):
    lm = wrap("gpt2")
    encoder = task_encoder(lm, task, 256, IV)
    episode = sample_episodes(task.splits["train"], 1, 2, 1, 3, "t")[0]
    prompt = encoder.encode(episode)
    text = lm.tokenizer.decode(prompt.ids[1:])
    for d in episode.demos:
        assert f"{d.text}\n{d.answer}\n\n\n" in text
    assert text.endswith(f"{episode.query.text}\n")
    assert lm.tokenizer.decode(prompt.answer) == episode.query.answer  # the query's gold answer, tokenized
    assert prompt.sep_class == [0, 0, 1]  # the demonstrations' one class, then the query's slot


def test_vocab_is_right_exactly_when_the_top_token_is_the_gold_answers_first(task):
    lm = wrap("llama")
    encoder = task_encoder(lm, task, 256, IV)
    scorer = make_scorer(lm, task, encoder, 4, True, Protocol())
    assert scorer.rule.name == "vocab"  # the open-vocabulary default
    prompts = [encoder.encode(e) for e in sample_episodes(task.splits["validation"], 1, 2, 8, 3, "v")]
    scores = scorer.runner.map(prompts, lambda b: METHODS["icl"]().predict(scorer, b), "t")
    predicted = scorer.predictions(scores, prompts)
    for row, p in enumerate(prompts):
        with torch.no_grad():
            top = int(lm.model(input_ids=torch.tensor([p.ids])).logits[0, -1].argmax())
        assert predicted[row] == (0 if top == p.answer[0] else 1)


@pytest.mark.parametrize("name", SUPPORTED)
def test_every_method_that_declares_open_vocabulary_runs_it_from_the_cli(tmp_path, antonyms, name, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "r.jsonl"
    args = ["-c", _config(tmp_path, antonyms), "-m", "tiny-gpt2", "-t", "antonym", "--quiet", "-n", "8"]
    small = ["-s", "2", "-e", "4", "--select-episodes", "4", "--shot", "2", "--ie-episodes", "2", "--dt-steps", "2"]
    small += ["--site-steps", "2", "--site-val-every", "1"]
    assert main([*args, *small, "--method", name, "--results", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["task_kind"] == "open_vocabulary" and set(record["metrics"]) == {"accuracy"}
    assert 0 <= record["metrics"]["accuracy"]["value"] <= 1 and "scoring" not in record["hyperparameters"]
    assert set(record["predicted_fraction"]) == {"(the gold answer)", "(none)"}


def test_methods_built_per_class_and_label_rules_are_refused(tmp_path, antonyms, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    args = ["-c", _config(tmp_path, antonyms), "-m", "tiny-gpt2", "-t", "antonym", "--quiet", "-n", "4"]
    for extra, says in (
        (["--method", "iv"], "--method iv does not apply to open-vocabulary task 'antonym'"),
        (["--method", "icl", "--score", "first-token"], "--score first-token does not apply to a open-vocabulary"),
        (["--method", "icl", "--demo-order", "class"], "needs classes to sort by"),
    ):
        assert main([*args, *extra, "--results", str(tmp_path / "r.jsonl")]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists()


def test_generation_is_judged_against_each_querys_own_answer(task):
    lm = wrap("gpt2")
    result = ivlib.evaluate("icl", lm, task, n=6, shot=2, score="generate", max_new_tokens=6)
    assert result.scores.shape[1] == 2 + 6  # the gold answer, none, then the decoded ids
    encoder = task_encoder(lm, task, 256, IV)
    for episode, predicted in zip(result.episodes, result.predictions):
        prompt = encoder.encode(episode)
        with torch.no_grad():
            out = lm.model.generate(torch.tensor([prompt.ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        text = lm.tokenizer.decode(out[0, len(prompt.ids) :].tolist(), skip_special_tokens=True).split("\n")[0]
        assert predicted == (0 if text.strip() == episode.query.answer else 1)


def test_hendel_task_vectors_equal_a_plain_loop_that_patches_one_prompt_at_a_time(task):
    lm = wrap("llama")
    encoder = task_encoder(lm, task, 256, IV)
    scorer = make_scorer(lm, task, encoder, 4, True, Protocol())
    method = HendelTaskVectors()
    # layer 0: at the last layer the patch would hand the zero-shot prompt the few-shot prompt's final state
    method.load_state({"layer": torch.tensor(0), "layer_scores": torch.zeros(2)})
    episodes = sample_episodes(task.splits["validation"], 1, 2, 6, 5, "v")
    prompts = [encoder.encode(e) for e in episodes]
    batched = scorer.runner.map(prompts, lambda b: method.predict(scorer, b), "t")
    for row, (episode, prompt) in enumerate(zip(episodes, prompts)):
        with (
            torch.no_grad(),
            edit_outputs(
                [lm.layout.blocks[0]], torch.tensor([0]), torch.tensor([len(prompt.ids) - 1]), read=True
            ) as sites,
        ):
            lm.model(input_ids=torch.tensor([prompt.ids]))  # the few-shot prompt: the vector at its query separator
        theta = sites[0].value
        alone = encoder.encode(episode.query_only())  # BOS and the query: the zero-shot prompt
        last = torch.tensor([len(alone.ids) - 1])
        with torch.no_grad(), edit_outputs([lm.layout.blocks[0]], torch.tensor([0]), last, replace=[theta]):
            logits = lm.model(input_ids=torch.tensor([alone.ids])).logits[0, -1]
        logprobs = torch.log_softmax(logits.float(), -1)
        assert batched[row, 0].item() == pytest.approx(logprobs[alone.answer[0]].item(), abs=1e-4)
    few_shot = scorer.runner.map(prompts, lambda b: METHODS["icl"]().predict(scorer, b), "t")
    alone = [encoder.encode(e.query_only()) for e in episodes]
    zero = scorer.runner.map(alone, lambda b: METHODS["zero-shot"]().predict(scorer, b), "t")
    assert not torch.allclose(batched, few_shot) and not torch.allclose(batched, zero)


def test_hendel_and_the_iv_papers_task_vectors_are_kept_apart(tmp_path, antonyms, monkeypatch):
    from ivlib.selection import load_records, select_best

    monkeypatch.chdir(REPO)
    out = str(tmp_path / "r.jsonl")
    args = ["-c", _config(tmp_path, antonyms), "-m", "tiny-gpt2", "-t", "antonym", "--quiet", "-n", "6", "--shot", "2"]
    for name in ("tv", "tv-hendel"):
        assert main([*args, "--method", name, "-s", "2", "-e", "4", "--select-episodes", "4", "--results", out]) == 0
    assert sorted(c.best.method for c in select_best(load_records(out))) == ["tv", "tv-hendel"]
    hendel = [json.loads(line) for line in Path(out).read_text().splitlines()][1]
    assert len(hendel["fit"]["layer_scores"]) == 2 and hendel["budget"]["fit_examples"] == 0


def test_an_unknown_column_is_refused(antonyms):
    with pytest.raises(UsageError, match="open_vocabulary column 'word' not in the data"):
        load_task("antonym", {"data_files": str(antonyms), "open_vocabulary": {"input": "word"}})


def test_fv_shuffles_answers_among_the_demonstrations(task):
    from ivlib.methods.fv import shuffle_labels

    episodes = sample_episodes(task.splits["train"], 1, 4, 10, 3, "t")
    shuffled = shuffle_labels(episodes, 42)
    for e, s in zip(episodes, shuffled):
        assert [d.text for d in e.demos] == [d.text for d in s.demos]
        assert sorted(d.answer for d in e.demos) == sorted(d.answer for d in s.demos)
    assert any([d.answer for d in e.demos] != [d.answer for d in s.demos] for e, s in zip(episodes, shuffled))
    assert np.all([s.query == e.query for e, s in zip(episodes, shuffled)])
