"""Function Vectors: cached indirect effects equal plain patched forwards; the edit changes logits."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from ivlib.cli import main
from ivlib.episodes import sample_episodes
from ivlib.errors import UsageError
from ivlib.hooks import edit_inputs
from ivlib.methods.fv import FunctionVectors, default_top_heads, shuffle_labels
from ivlib.methods.icl import ICL
from ivlib.scoring import Scorer, no_edit

REPO = Path(__file__).resolve().parent.parent


def _fitted(lm, encoder, task, n_top=3):
    train = sample_episodes(task.splits["train"], 2, 2, 6, 5, "train/extract")
    fv = FunctionVectors(n_top_heads=n_top, ie_episodes=4, seed=1)
    fv.fit(Scorer(lm, encoder.label_ids, 3, quiet=True), encoder, train)
    return fv, train


def _plain_effect(lm, encoder, fv, prompt, layer, head):
    """One prompt, full forward, patch head (layer, head) at the last token only."""
    hd = fv.mean_act.shape[-1]
    ids = torch.tensor([prompt.ids])
    last = len(prompt.ids) - 1

    def p_correct(patch):
        def pre(_mod, args):
            x = args[0].clone()
            if patch:
                x[0, last, head * hd : (head + 1) * hd] = fv.mean_act[layer, head]
            return (x,)

        handle = lm.layout.attn_out[layer].register_forward_pre_hook(pre)
        try:
            with torch.no_grad():
                logits = lm.model(input_ids=ids).logits[0, -1]
        finally:
            handle.remove()
        return torch.softmax(logits, -1)[encoder.label_ids[prompt.label]]

    return (p_correct(True) - p_correct(False)).item()


def test_cached_indirect_effects_equal_plain_patched_forwards(lm, encoder, task):
    fv, train = _fitted(lm, encoder, task)
    trials = [encoder.encode(e) for e in shuffle_labels(train[:4], 1)]
    for layer, head in [(0, 0), (1, 3), (0, 2)]:
        plain = sum(_plain_effect(lm, encoder, fv, p, layer, head) for p in trials) / len(trials)
        assert abs(fv.effects[layer, head].item() - plain) < 1e-5
    assert fv.effects.shape == (2, 4)


def test_shuffled_trials_keep_demos_and_query_but_permute_labels(task):
    eps = sample_episodes(task.splits["train"], 2, 3, 20, 5, "train/extract")
    shuffled = shuffle_labels(eps, 0)
    assert [e.query for e in shuffled] == [e.query for e in eps]
    assert all([d.text for d in a.demos] == [d.text for d in b.demos] for a, b in zip(eps, shuffled))
    assert any([d.label for d in a.demos] != [d.label for d in b.demos] for a, b in zip(eps, shuffled))


def test_vector_is_the_sum_of_projected_head_means_and_changes_logits(lm, encoder, task):
    fv, _ = _fitted(lm, encoder, task, n_top=2)
    assert len(fv.heads) == 2 and fv.layer == lm.layout.n_layers // 3
    effects = fv.effects.flatten()
    assert sorted(effects.tolist(), reverse=True)[:2] == [fv.effects[l, h].item() for l, h in fv.heads]
    hd = fv.mean_act.shape[-1]
    expected = torch.zeros(lm.layout.d_model)
    for layer, head in fv.heads:
        x = torch.zeros(1, lm.layout.n_heads * hd)
        x[0, head * hd : (head + 1) * hd] = fv.mean_act[layer, head]
        with torch.no_grad():
            expected += lm.layout.attn_out[layer](x)[0]
    torch.testing.assert_close(fv.vector, expected, atol=1e-5, rtol=1e-5)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    val = [encoder.encode(e) for e in sample_episodes(task.splits["validation"], 2, 1, 4, 5, "v")]
    batch = scorer.batch(val)
    assert not torch.allclose(fv.predict(scorer, batch), ICL().predict(scorer, batch), atol=1e-5)


def test_mean_activations_are_read_at_the_query_separator(gpt2, task):
    from ivlib.prompts import PromptEncoder

    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    fv, train = _fitted(gpt2, encoder, task)
    p = encoder.encode(train[0])
    reads = []
    with edit_inputs(gpt2.layout.attn_out, torch.tensor([0]), torch.tensor([p.sep_pos[-1]]), read=True) as sites:
        gpt2.model(input_ids=torch.tensor([p.ids]))
    reads = torch.stack([s.value[0] for s in sites])  # [L, F]
    one = FunctionVectors(2, 1)
    one.fit(Scorer(gpt2, encoder.label_ids, 2, quiet=True), encoder, train[:1])
    torch.testing.assert_close(one.mean_act.reshape(2, -1), reads, atol=1e-5, rtol=1e-5)


def test_default_head_count_rule():
    assert default_top_heads(32, 32) == 20 and default_top_heads(28, 16) == 9 and default_top_heads(2, 4) == 1


def test_fv_through_the_cli_records_heads_and_reloads(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results, state = tmp_path / "runs.jsonl", tmp_path / "fv.safetensors"
    argv = [
        "-c",
        "config/tiny.yaml",
        "-m",
        "tiny-gpt2",
        "-t",
        "review_sentiment",
        "--method",
        "fv",
        "-s",
        "1",
        "-e",
        "6",
        "--ie-episodes",
        "4",
        "--n-top-heads",
        "3",
        "-n",
        "20",
        "--quiet",
        "--results",
        str(results),
    ]
    assert main(argv + ["--save-vectors", str(state)]) == 0
    assert main(argv + ["--load-vectors", str(state)]) == 0
    fitted, loaded = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(fitted["fit"]["top_heads"]) == 3 and fitted["fit"]["layer"] == 0
    assert fitted["hyperparameters"]["n_top_heads"] == 3
    assert loaded["metrics"] == fitted["metrics"]


def test_head_chunking_does_not_change_the_effects(gpt2, task):
    from ivlib.prompts import PromptEncoder

    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    train = sample_episodes(task.splits["train"], 2, 1, 5, 8, "train/extract")
    results = []
    for rows in (128, 4, 1):  # all heads of a layer in one forward; 2 per forward; one per forward
        fv = FunctionVectors(n_top_heads=2, ie_episodes=5)
        fv.rows_per_forward = rows
        fv.fit(Scorer(gpt2, encoder.label_ids, 2, quiet=True), encoder, train)
        results.append(fv.effects)
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[0], results[2], atol=1e-6, rtol=1e-5)


def test_last_token_edits_write_one_slot_of_a_preallocated_prefix_cache(lm, encoder, task, monkeypatch):
    """The per-head search runs every edit over one prefix cache written in place: the prefix's keys
    are the same tensor before and after every edit, and the scores equal the growing-cache path."""
    fv, train = _fitted(lm, encoder, task)
    trials = [encoder.encode(e) for e in shuffle_labels(train[:3], 1)]
    scorer = Scorer(lm, encoder.label_ids, 3, quiet=True)
    batch = scorer.batch(trials)
    cut = batch.input_ids.shape[1] - 1
    made, prefix_at_start = [], []
    real = Scorer._repeated_cache

    def spy(self, base, g):
        made.append(real(self, base, g))
        prefix_at_start.append(made[-1].layers[0].keys[:, :, :cut].clone())  # before any edit ran on it
        for layer in made[-1].layers:  # a forward that read the free slot before writing it would score NaN
            layer.keys[:, :, cut:] = float("nan")
            layer.values[:, :, cut:] = float("nan")
        return made[-1]

    monkeypatch.setattr(Scorer, "_repeated_cache", spy)
    edits = [
        (1, no_edit),
        (4, partial(fv._patch_heads, scorer, 1, [0, 1, 2, 3])),
        (4, partial(fv._patch_heads, scorer, 0, [0, 1, 2, 3])),
    ]
    in_place = scorer.last_token_groups(batch, edits)
    assert [type(c.layers[0]).__name__ for c in made] == ["_SlotLayer", "_SlotLayer"]  # one per repeat count, reused
    keys = made[1].layers[0].keys  # [B * 4, kv_heads, cut + 1, head_dim]
    assert keys.shape[0] == 12 and keys.shape[2] == cut + 1
    torch.testing.assert_close(keys[:, :, :cut], prefix_at_start[1], atol=0, rtol=0)  # two edits ran over it
    assert torch.isfinite(keys[:, :, cut]).all()  # the edits' own token went into the one free slot

    scorer.preallocate = False  # the growing cache every edit copies (what sliding-window models get)
    made.clear()
    growing = scorer.last_token_groups(batch, edits)
    assert [type(c).__name__ for c in made] == ["DynamicCache", "DynamicCache"]
    for a, b in zip(in_place, growing):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _fits_rows(monkeypatch, limit: int, seen: list):
    """A device whose head-search forwards hold at most `limit` rows (batch rows x heads tried)."""
    real = Scorer._repeated_cache

    def guarded(self, base, g):
        rows = base.layers[0].keys.shape[0] * g
        seen.append(rows)
        if rows > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, base, g)

    monkeypatch.setattr(Scorer, "_repeated_cache", guarded)


def test_head_search_out_of_memory_halves_the_rows_per_forward_not_the_batch(gpt2, task, monkeypatch):
    from ivlib.prompts import PromptEncoder

    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    trials = [encoder.encode(e) for e in sample_episodes(task.splits["train"], 2, 1, 6, 8, "train/extract")]
    reference = FunctionVectors(n_top_heads=2, ie_episodes=6)
    reference.mean_act = reference.mean_activations(Scorer(gpt2, encoder.label_ids, 3, quiet=True), trials)
    expected = reference.indirect_effects(Scorer(gpt2, encoder.label_ids, 3, quiet=True), trials)

    seen: list[int] = []
    _fits_rows(monkeypatch, 6, seen)
    fv = FunctionVectors(n_top_heads=2, ie_episodes=6)
    fv.mean_act = reference.mean_act
    scorer = Scorer(gpt2, encoder.label_ids, 3, quiet=True)  # a fixed batch size: it must stay 3
    effects = fv.indirect_effects(scorer, trials)
    assert scorer.runner.batch_size == 3 and fv.rows_per_forward == 8  # 128 -> 64 -> 32 -> 16 -> 8: 2 heads x 3 rows
    assert max(seen) == 12 and 6 in seen and all(r <= 6 for r in seen[seen.index(6) :])
    torch.testing.assert_close(effects, expected, atol=1e-6, rtol=1e-5)

    _fits_rows(monkeypatch, 2, seen)  # not even one head per row of the batch: the batch must shrink
    fv = FunctionVectors(n_top_heads=2, ie_episodes=6)
    fv.mean_act = reference.mean_act
    with pytest.raises(UsageError, match="out of memory at batch size 3"):
        fv.indirect_effects(Scorer(gpt2, encoder.label_ids, 3, quiet=True), trials)
    fv.rows_per_forward = 128
    auto = Scorer(gpt2, encoder.label_ids, 3, quiet=True, shrink_on_oom=True)
    torch.testing.assert_close(fv.indirect_effects(auto, trials), expected, atol=1e-6, rtol=1e-5)
    assert auto.runner.batch_size == 1 and fv.rows_per_forward == 3  # rows down to the batch (3), then batch 3 -> 1


def test_resume_skips_an_fv_run_whose_head_count_comes_from_the_default_rule(tmp_path, monkeypatch, capsys):
    """The record keeps the head count as asked (None: the ~2% rule), so the same command matches it."""
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    argv = [
        "-c",
        "config/tiny.yaml",
        "-m",
        "tiny-gpt2",
        "-t",
        "review_sentiment",
        "--method",
        "fv",
        "-s",
        "1",
        "-e",
        "4",
        "--ie-episodes",
        "2",
        "-n",
        "10",
        "--quiet",
        "--results",
        str(results),
        "--resume",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    assert "skipped (--resume)" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["hyperparameters"]["n_top_heads"] is None
    assert len(record["fit"]["top_heads"]) == default_top_heads(2, 4)
