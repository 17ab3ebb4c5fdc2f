"""Deep-Thinking: step 1 is plain ICL, the update rule's invariants, batching, and the CLI record."""

import json
from pathlib import Path

import pytest
import torch

from ivlib.cli import main
from ivlib.episodes import sample_episodes
from ivlib.errors import UsageError
from ivlib.kvcache import read_kv
from ivlib.methods.dt import DeepThinking
from ivlib.scoring import Scorer


def _batch(lm, encoder, task, n=4, shot=1, seed=5):
    eps = sample_episodes(task.splits["validation"], 2, shot, n, seed, "validation/eval")
    scorer = Scorer(lm, encoder.label_ids, n, quiet=True)
    prompts = [encoder.encode(e) for e in eps]
    return scorer, prompts, scorer.batch(prompts)


def test_step_one_equals_plain_icl(lm, encoder, task):
    scorer, _, batch = _batch(lm, encoder, task, shot=2)
    dt = DeepThinking(dt_steps=1)
    torch.testing.assert_close(dt.step_scores(scorer, batch, 1)[:, 0], scorer.label_scores(batch), atol=1e-4, rtol=1e-4)


def test_eta_zero_keeps_every_step_at_step_one(lm, encoder, task):
    scorer, _, batch = _batch(lm, encoder, task)
    scores = DeepThinking(dt_eta=0.0).step_scores(scorer, batch, 4)  # [B, 4, C]
    for t in range(1, 4):
        torch.testing.assert_close(scores[:, t], scores[:, 0], atol=1e-5, rtol=1e-5)
    moving = DeepThinking(dt_eta=0.5).step_scores(scorer, batch, 4)
    assert (moving[:, 3] - moving[:, 0]).abs().max() > 1e-3  # the update does something when eta > 0


@pytest.mark.parametrize("positions,layer0_fixed", [("pinned", True), ("shifted", False)])
def test_pinned_positions_leave_layer0_cache_unchanged(lm, encoder, task, positions, layer0_fixed):
    """Layer-0 keys/values depend only on the token and its position: pinned re-encoding
    reproduces them exactly, shifted re-encoding moves them (GPT-2: absolute, Llama: rotary)."""
    scorer, _, batch = _batch(lm, encoder, task)
    trace = []
    DeepThinking(dt_eta=0.5, dt_positions=positions).step_scores(scorer, batch, 3, trace=trace)
    assert len(trace) == 3
    k0, v0 = trace[0][0]
    for state in trace[1:]:
        k, v = state[0]
        same = torch.allclose(k, k0, atol=1e-5) and torch.allclose(v, v0, atol=1e-5)
        assert same == layer0_fixed
    assert not torch.allclose(trace[2][-1][0], trace[0][-1][0], atol=1e-5)  # the last layer moves either way


def test_gqa_cache_shapes(encoder, task):
    from conftest import wrap

    lm = wrap("llama")  # 4 query heads, 2 key/value heads
    scorer, _, batch = _batch(lm, encoder, task)
    trace = []
    DeepThinking().step_scores(scorer, batch, 2, trace=trace)
    k, v = trace[1][0]
    head_dim = lm.model.config.hidden_size // lm.model.config.num_attention_heads
    assert k.shape[1] == lm.model.config.num_key_value_heads == 2 and k.shape[-1] == head_dim
    assert k.dtype == v.dtype == torch.float32


def test_batched_equals_one_at_a_time(lm, encoder, task):
    scorer, prompts, batch = _batch(lm, encoder, task, n=5, shot=2)
    dt = DeepThinking(dt_eta=0.2)
    together = dt.step_scores(scorer, batch, 3)
    for i, p in enumerate(prompts):
        alone = dt.step_scores(scorer, scorer.batch([p]), 3)
        torch.testing.assert_close(together[i], alone[0], atol=1e-4, rtol=1e-4)


def test_overflowing_cache_is_reported_with_its_layer(gpt2, task):
    from ivlib.prompts import PromptEncoder

    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    scorer, _, batch = _batch(gpt2, encoder, task)
    with pytest.raises(UsageError, match=r"non-finite values in the tuned cache at layer \d+, step 2"):
        DeepThinking(dt_eta=1e300).step_scores(scorer, batch, 2)  # overflows float32, as fp16 would at 65504


def test_cache_without_layers_is_refused():
    with pytest.raises(UsageError, match="DynamicCache"):
        read_kv(object(), "odd-model")


def test_fit_picks_the_best_step_on_validation(lm, encoder, task):
    val = sample_episodes(task.splits["validation"], 2, 1, 12, 1, "validation/select")
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    dt = DeepThinking(dt_steps=4, dt_eta=0.3)
    dt.fit(scorer, encoder, [], val)
    assert len(dt.curve) == 4
    assert dt.step == 1 + max(range(4), key=lambda t: (dt.curve[t], -t))
    fixed = DeepThinking(dt_steps=4, dt_step=2)
    fixed.fit(scorer, encoder, [], val)
    assert fixed.step == 2 and fixed.curve == []


def _dt_run(out: Path) -> list[str]:
    """A small DT run on the tiny model: 3 steps searched on 8 validation episodes."""
    argv = ["-c", "config/tiny.yaml", "-m", "tiny-llama", "-t", "review_sentiment", "--method", "dt"]
    return [
        *argv,
        "--dt-steps",
        "3",
        "--select-episodes",
        "8",
        "-n",
        "8",
        "--batch-size",
        "4",
        "--quiet",
        "--results",
        str(out),
    ]


def test_cli_dt_record_has_the_curve_and_step(tmp_path):
    out = tmp_path / "runs.jsonl"
    rc = main(_dt_run(out))
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["method"] == "dt" and len(record["fit"]["curve"]) == 3
    assert record["fit"]["step"] == 1 + record["fit"]["curve"].index(max(record["fit"]["curve"]))
    assert record["hyperparameters"]["dt_steps"] == 3 and record["hyperparameters"]["dt_positions"] == "shifted"
    assert record["hyperparameters"]["ext_shot"] is None


def test_cli_dt_refuses_zero_shot(tmp_path, capsys):
    rc = main(
        [
            "-c",
            "config/tiny.yaml",
            "-m",
            "tiny-llama",
            "-t",
            "review_sentiment",
            "--method",
            "dt",
            "--shot",
            "0",
            "--results",
            str(tmp_path / "r.jsonl"),
        ]
    )
    assert rc == 2 and "--shot 0" in capsys.readouterr().err


def test_final_step_alone_equals_the_last_of_every_step(lm, encoder, task):
    scorer, _, batch = _batch(lm, encoder, task)
    dt = DeepThinking(dt_eta=0.3)
    every = dt.step_scores(scorer, batch, 3)
    last = dt.step_scores(scorer, batch, 3, every_step=False)
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], every[:, -1])


def test_the_chosen_step_is_saved_and_a_loaded_run_scores_as_the_fitted_one(tmp_path, capsys):
    """The step search is DT's fit: saved, a test run loads it instead of searching again."""
    out, state = tmp_path / "runs.jsonl", tmp_path / "dt.safetensors"
    argv = _dt_run(out)
    assert main([*argv, "--save-vectors", str(state)]) == 0
    assert main([*argv, "--load-vectors", str(state), "--run-test"]) == 0
    assert main([*argv, "--run-test"]) == 0
    fitted, loaded, searched = [json.loads(line) for line in out.read_text().splitlines()]
    assert loaded["fit"]["loaded_from"] == str(state)  # no search: the state's step
    assert loaded["fit"]["step"] == searched["fit"]["step"] == fitted["fit"]["step"]
    assert loaded["fit"]["curve"] == fitted["fit"]["curve"]
    assert loaded["metrics"] == searched["metrics"] and loaded["hyperparameters"] == searched["hyperparameters"]
    assert loaded["budget"]["selection_examples"] == fitted["budget"]["selection_examples"] > 0
    bad = tmp_path / "bad.safetensors"
    from test_state_spec import _put, _rewrite

    _rewrite(state, bad, _put("step", lambda s: s * 0 + 7))  # not one of the 3 steps tried
    capsys.readouterr()
    assert main([*argv, "--load-vectors", str(bad), "--run-test", "--results", str(tmp_path / "b.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step 7 is not one of the 3 steps tried" in err, err
