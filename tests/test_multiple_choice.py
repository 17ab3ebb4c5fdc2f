"""Multiple-choice tasks: options scored as continuations, CommonsenseQA's schema from local files."""

import json

import numpy as np
import pytest
import torch

from ivlib.cli import main
from ivlib.episodes import sample_episodes
from ivlib.methods.dt import DeepThinking
from ivlib.prompts import PromptEncoder
from ivlib.rules import Answers, Rule
from ivlib.scoring import Scorer
from ivlib.tasks import load_task

COLOURS = ["red", "green", "blue", "yellow", "black"]
MC_SPEC = {"multiple_choice": {"options": "choices.text", "option_keys": "choices.label", "answer": "answerKey"}}


def write_csqa(path, n=60, seed=0):
    """CommonsenseQA's schema: question, choices {label, text}, answerKey (empty = hidden)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            opts = list(rng.permutation(COLOURS))
            answer = int(rng.integers(0, 5))
            f.write(
                json.dumps(
                    {
                        "id": str(i),
                        "question": f"Which colour is number {i} in the list of {opts[answer]}?",
                        "question_concept": "colour",
                        "choices": {"label": list("ABCDE"), "text": opts},
                        "answerKey": "ABCDE"[answer] if i != 7 else "",
                    }
                )
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory):
    path = write_csqa(tmp_path_factory.mktemp("csqa") / "train.jsonl")
    return load_task("csqa", {"data_files": {"train": str(path)}, **MC_SPEC})


def test_task_reads_options_and_answers(mc_task):
    train = mc_task.splits["train"]
    assert mc_task.multiple_choice and mc_task.n_classes == 5 and mc_task.label_words == []
    assert all(len(o) == 5 for o in train.options)
    assert all(f"list of {o[y]}?" in t for t, o, y in zip(train.texts, train.options, train.labels))
    total = sum(len(s.texts) for s in mc_task.splits.values())
    assert total == 59  # the row with a hidden answer is dropped
    assert "carved" in mc_task.provenance


def test_episodes_have_shot_demos_and_a_distinct_query(mc_task):
    eps = sample_episodes(mc_task.splits["train"], 5, 3, 20, 1, "train/x")
    for e in eps:
        assert len(e.demos) == 3 and e.query.text not in {d.text for d in e.demos}
        assert e.query.options is not None and len(e.query.options) == 5


def _reference_option_logprobs(lm, prompt):
    """Plain loop: each option appended to the whole prompt, one full forward, summed log-probs."""
    out = []
    for option in prompt.options:
        ids = torch.tensor([prompt.ids + option])
        logprobs = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), dim=-1)
        start = len(prompt.ids)
        out.append(sum(float(logprobs[start + j - 1, t]) for j, t in enumerate(option)))
    return torch.tensor(out)


def test_option_scores_equal_full_sequence_reference(lm, mc_task):
    encoder = PromptEncoder(lm.tokenizer, [], add_bos=True)
    eps = sample_episodes(mc_task.splits["validation"], 5, 1, 4, 2, "validation/eval")
    prompts = [encoder.encode(e) for e in eps]
    assert any(len(o) > 1 for p in prompts for o in p.options)  # multi-token options are exercised
    scorer = Scorer(lm, [], 4, quiet=True)
    with torch.inference_mode():
        scores = scorer.label_scores(scorer.batch(prompts))
        for i, p in enumerate(prompts):
            torch.testing.assert_close(scores[i], _reference_option_logprobs(lm, p), atol=1e-3, rtol=1e-4)


def test_dt_step_one_equals_icl_on_options(lm, mc_task):
    encoder = PromptEncoder(lm.tokenizer, [], add_bos=True)
    eps = sample_episodes(mc_task.splits["validation"], 5, 2, 3, 2, "validation/eval")
    scorer = Scorer(lm, [], 3, quiet=True)
    batch = scorer.batch([encoder.encode(e) for e in eps])
    torch.testing.assert_close(
        DeepThinking().step_scores(scorer, batch, 2)[:, 0], scorer.label_scores(batch), atol=1e-3, rtol=1e-4
    )


def test_length_normalised_prediction():
    from ivlib.prompts import EncodedPrompt

    prompts = [EncodedPrompt([1], [0], [0], 0, 0, options=[[5], [6, 7, 8]])]
    scores = torch.tensor([[-2.0, -4.5]])  # per token: -2 vs -1.5
    scorer = Scorer.__new__(Scorer)  # predictions need no model
    for rule, chosen in (("full-mean", 1), ("full", 0)):  # the default per token; --score full by the sum
        scorer.rule = Rule(rule, Answers((), ()))
        assert scorer.predictions(scores, prompts).tolist() == [chosen]
    assert scores.argmax(-1).tolist() == [0]


@pytest.fixture()
def mc_config(tmp_path):
    data = write_csqa(tmp_path / "csqa-train.jsonl")
    cfg = tmp_path / "mc.yaml"
    cfg.write_text(
        "models:\n  tiny-llama: {builtin: tiny-llama}\ntasks:\n  csqa-local:\n"
        f"    data_files: {{train: {data}}}\n"
        "    multiple_choice: {options: choices.text, option_keys: choices.label, answer: answerKey}\n"
    )
    return str(cfg)


@pytest.mark.parametrize("method", ["zero-shot", "icl", "dt"])
def test_cli_runs_multiple_choice(mc_config, tmp_path, method):
    out = tmp_path / "runs.jsonl"
    rc = main(
        [
            "-c",
            mc_config,
            "-m",
            "tiny-llama",
            "-t",
            "csqa-local",
            "--method",
            method,
            "--dt-steps",
            "2",
            "--select-episodes",
            "4",
            "-n",
            "6",
            "--batch-size",
            "3",
            "--quiet",
            "--results",
            str(out),
        ]
    )
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["task_kind"] == "multiple_choice"
    assert set(record["metrics"]) == {"accuracy", "accuracy_sum"}
    assert sum(record["predicted_fraction"].values()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("method", ["iv", "tv", "fv", "i2cl"])
def test_steering_methods_refuse_multiple_choice(mc_config, tmp_path, capsys, method):
    out = tmp_path / "runs.jsonl"
    out.write_text('{"kept": 1}\n')
    rc = main(["-c", mc_config, "-m", "tiny-llama", "-t", "csqa-local", "--method", method, "--results", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "multiple-choice" in err[0] and "accepted: zero-shot, icl, dt" in err[0]
    assert out.read_text() == '{"kept": 1}\n'
