"""Deep-Thinking on sliding-window models (Gemma 3's mix, Mistral's all-sliding form).

When the demonstrations twice and the query fit the window, a sliding layer attends as a full one,
so tuning and scoring must equal the full-attention path with the same weights; a prompt beyond
the window is refused with one line, before any compute.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ivlib.builtin_tasks import vocabulary
from ivlib.cli import main
from ivlib.episodes import sample_episodes
from ivlib.errors import UsageError
from ivlib.kvcache import read_kv, sliding_window
from ivlib.layout import discover_layout
from ivlib.methods.dt import DeepThinking
from ivlib.models import LoadedModel
from ivlib.prompts import PromptEncoder
from ivlib.scoring import Scorer
from ivlib.tiny import SLIDING_WINDOW, build_tokenizer, tiny_config


def with_window(arch: str, window: int | None) -> LoadedModel:
    """The tiny model of `arch` with its sliding window set to `window`: the same weights whatever it is."""
    tokenizer = build_tokenizer(vocabulary())
    config = tiny_config(arch, len(tokenizer))
    config.sliding_window = window
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(
        f"tiny-{arch}", model, tokenizer, discover_layout(model), torch.device("cpu"), torch.float32, "t", add_bos=True
    )


def prompts_and_need(lm: LoadedModel, task, shot: int = 1, n: int = 4) -> tuple[list, int]:
    """Prompts of varied lengths, and the fewest window positions DT needs for them (as dt.py counts)."""
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    prompts = [encoder.encode(e) for e in sample_episodes(task.splits["validation"], 2, shot, n, 3, "validation/eval")]
    longest = max(p.query_start for p in prompts)
    query = max(len(p.ids) - p.query_start for p in prompts)
    return prompts, max(2 * longest + 1, longest + query)


def dt_scores(lm: LoadedModel, prompts: list, positions: str) -> torch.Tensor:
    scorer = Scorer(lm, PromptEncoder(lm.tokenizer, ["bad", "good"], add_bos=True).label_ids, len(prompts), quiet=True)
    dt = DeepThinking(dt_eta=0.3, dt_positions=positions)
    dt.check_prompts(scorer, prompts)
    return dt.step_scores(scorer, scorer.batch(prompts), 4)  # [B, 4, C]: every step's scores


def layer_types(lm: LoadedModel, prompts: list) -> list[str]:
    scorer = Scorer(lm, [5, 6], len(prompts), quiet=True)
    batch = scorer.batch(prompts)
    _, cache = scorer.encode(batch.input_ids, batch.attention_mask, batch.position_ids)
    return [type(layer).__name__ for layer in cache.layers]


@pytest.mark.parametrize("positions", ["shifted", "pinned"])
@pytest.mark.parametrize(
    "arch,reference",
    [("mistral_sw", None), ("gemma3", 10**6)],  # Mistral without a window is full attention; Gemma 3's is huge
)
def test_tuning_inside_the_window_equals_full_attention(task, arch, reference, positions):
    full = with_window(arch, reference)
    prompts, need = prompts_and_need(full, task)
    tight = with_window(arch, need)  # just wide enough
    assert "DynamicSlidingWindowLayer" in layer_types(tight, prompts)
    assert ("DynamicSlidingWindowLayer" in layer_types(full, prompts)) == (reference is not None)
    torch.testing.assert_close(dt_scores(tight, prompts, positions), dt_scores(full, prompts, positions))
    # the window is real: one much narrower changes even plain ICL's scores on these prompts
    narrow = with_window(arch, need // 4)
    scorer = Scorer(narrow, [5, 6], len(prompts), quiet=True)
    wide = Scorer(full, [5, 6], len(prompts), quiet=True)
    assert not torch.allclose(scorer.label_scores(scorer.batch(prompts)), wide.label_scores(wide.batch(prompts)))


@pytest.mark.parametrize("arch", ["mistral_sw", "gemma3"])
def test_a_prompt_beyond_the_window_is_refused_before_any_compute(task, arch):
    full = with_window(arch, None if arch == "mistral_sw" else 10**6)
    prompts, need = prompts_and_need(full, task)
    lm = with_window(arch, need - 1)
    scorer = Scorer(lm, [5, 6], len(prompts), quiet=True)
    with pytest.raises(UsageError, match=f"{need - 1}-token sliding window and these prompts need {need} positions"):
        DeepThinking().check_prompts(scorer, prompts)


def test_a_cache_whose_window_dropped_entries_cannot_be_read(task):
    lm = with_window("mistral_sw", 8)
    prompts, _ = prompts_and_need(lm, task)
    scorer = Scorer(lm, [5, 6], len(prompts), quiet=True)
    batch = scorer.batch(prompts)
    _, cache = scorer.encode(batch.input_ids, batch.attention_mask, batch.position_ids)
    with pytest.raises(UsageError, match="exceed its 8-token sliding window"):
        read_kv(cache, lm.name)


def test_the_window_is_read_as_the_cache_builds_it():
    assert sliding_window(with_window("gemma3", 100).model.config) == 100  # layer 1 is full attention
    assert sliding_window(with_window("mistral_sw", 77).model.config) == 77
    assert sliding_window(with_window("mistral_sw", None).model.config) is None
    assert sliding_window(with_window("llama", None).model.config) is None


def test_cli_dt_on_a_sliding_window_model(tmp_path, capsys):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  tiny-gemma3: {builtin: tiny-gemma3}\n")
    results = tmp_path / "runs.jsonl"
    argv = ["-c", str(config), "-m", "tiny-gemma3", "-t", "review_sentiment", "--method", "dt", "--quiet"]
    argv += ["--dt-steps", "2", "--select-episodes", "4", "-n", "4", "--results", str(results)]
    assert main(argv) == 0
    assert json.loads(results.read_text())["fit"]["step"] in (1, 2)
    capsys.readouterr()
    assert main(argv + ["--shot", "4"]) == 2  # 4 shots: about 2 x 206 tokens, beyond the 256-token window
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{SLIDING_WINDOW}-token sliding window" in err
