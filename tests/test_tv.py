"""Task Vectors: the edit is one replaced position at one layer; the cached layer search is exact."""

import json
from pathlib import Path

import torch

from ivlib.cli import main
from ivlib.episodes import sample_episodes
from ivlib.hooks import edit_outputs
from ivlib.methods.tv import TaskVectors
from ivlib.scoring import Scorer

REPO = Path(__file__).resolve().parent.parent


def _fitted(lm, encoder, task):
    train = sample_episodes(task.splits["train"], 2, 2, 6, 3, "train/extract")
    val = sample_episodes(task.splits["validation"], 2, 1, 10, 3, "validation/select")
    tv = TaskVectors()
    tv.fit(Scorer(lm, encoder.label_ids, 4, quiet=True), encoder, train, val)
    return tv, val


def test_cached_layer_search_equals_full_forwards(lm, encoder, task):
    tv, val = _fitted(lm, encoder, task)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    batch = scorer.batch([encoder.encode(e) for e in val[:5]])
    edits = [tv._edit(scorer, layer) for layer in range(lm.layout.n_layers)]
    cached = scorer.last_token_variants(batch, edits)  # [L, B, C]
    for layer in range(lm.layout.n_layers):
        with scorer.at_last_token(batch, tv._edit(scorer, layer)):
            full = scorer.label_scores(batch)
        torch.testing.assert_close(cached[layer], full, atol=1e-4, rtol=1e-4)
    assert tv.layer == max(range(lm.layout.n_layers), key=lambda l: (tv.layer_scores[l], -l))
    assert len(tv.layer_scores) == lm.layout.n_layers


def test_tv_replaces_exactly_one_position_at_one_layer(lm, encoder, task):
    tv, val = _fitted(lm, encoder, task)
    tv.layer = 0
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    batch = scorer.batch([encoder.encode(e) for e in val[:3]])
    b, t = batch.input_ids.shape
    rows, cols = torch.arange(b).repeat_interleave(t), torch.arange(t).repeat(b)
    blocks = lm.layout.blocks

    def block_outputs(edit):
        with edit(), edit_outputs(blocks, rows, cols, read=True) as sites:
            scorer.forward(batch)
        return [s.value.view(b, t, -1) for s in sites]

    import contextlib

    plain = block_outputs(contextlib.nullcontext)
    edited = block_outputs(lambda: scorer.at_last_token(batch, tv._edit(scorer, 0)))
    mask = batch.attention_mask.bool()
    # layer 0: only the last column changed, and it now holds theta
    torch.testing.assert_close(edited[0][:, -1], tv.theta[0].expand(b, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(edited[0][:, :-1][mask[:, :-1]], plain[0][:, :-1][mask[:, :-1]])
    # later layers: earlier columns untouched (causality), the last one differs
    torch.testing.assert_close(edited[1][:, :-1][mask[:, :-1]], plain[1][:, :-1][mask[:, :-1]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(edited[1][:, -1], plain[1][:, -1], atol=1e-4)


def test_tv_through_the_cli_records_its_layer(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results, state = tmp_path / "runs.jsonl", tmp_path / "tv.safetensors"
    argv = [
        "-c",
        "config/tiny.yaml",
        "-m",
        "tiny-llama",
        "-t",
        "review_sentiment",
        "--method",
        "tv",
        "-s",
        "1",
        "-e",
        "6",
        "-n",
        "20",
        "--select-episodes",
        "12",
        "--quiet",
        "--results",
        str(results),
    ]
    assert main(argv + ["--save-vectors", str(state)]) == 0
    assert main(argv + ["--load-vectors", str(state)]) == 0
    fitted, loaded = [json.loads(line) for line in results.read_text().splitlines()]
    assert fitted["fit"]["layer"] in (0, 1) and len(fitted["fit"]["layer_scores"]) == 2
    assert fitted["fit"]["select_episodes"] == 12
    assert loaded["fit"]["layer"] == fitted["fit"]["layer"] and loaded["fit"]["loaded_from"] == str(state)
    assert loaded["metrics"] == fitted["metrics"]
