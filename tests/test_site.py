"""Soft Injection (SITE): the mixing edit is exact, batching is harmless, the optimisation lowers the
loss and touches only the mixing logits, the best validation checkpoint is kept, and the CLI, the
state file and the Python API run it."""

import json
from pathlib import Path

import pytest
import torch

import ivlib
from ivlib.cli import main
from ivlib.episodes import sample_episodes
from ivlib.errors import UsageError
from ivlib.hooks import edit_inputs
from ivlib.methods.icl import ICL
from ivlib.methods.site import SoftInjection, head_means, soft_injection
from ivlib.scoring import Scorer

REPO = Path(__file__).resolve().parent.parent
CLI = ["-c", "config/tiny.yaml", "-m", "tiny-llama", "-t", "review_sentiment", "--method", "site"]
CLI += ["-s", "1", "-e", "6", "--select-episodes", "6", "--site-steps", "4", "--site-val-every", "2"]
CLI += ["-n", "12", "--batch-size", "4", "--quiet"]


def _prompts(encoder, task, n=5, seed=3, shot=1, split="train"):
    eps = sample_episodes(task.splits[split], 2, shot, n, seed, f"{split}/x")
    return eps, [encoder.encode(e) for e in eps], [encoder.encode(e.query_only()) for e in eps]


def _random_state(lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    site = SoftInjection()
    site.emb = torch.randn(lm.layout.n_layers, lm.layout.n_heads, 16, generator=g)
    site.logits = torch.randn(lm.layout.n_layers, lm.layout.n_heads, generator=g)
    return site


def test_embeddings_and_scores_do_not_depend_on_the_batch_size(lm, encoder, task):
    _, few_shot, zero_shot = _prompts(encoder, task, n=6)
    embs, scores = [], []
    site = _random_state(lm)
    for size in (1, 4):
        scorer = Scorer(lm, encoder.label_ids, size, quiet=True)
        embs.append(head_means(scorer, few_shot, "t"))
        scores.append(scorer.runner.map(zero_shot, lambda b: site.predict(scorer, b), "t"))
    assert embs[0].shape == (lm.layout.n_layers, lm.layout.n_heads, 16)
    torch.testing.assert_close(embs[0], embs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)


def test_embedding_is_each_heads_o_proj_input_at_the_last_token(lm, encoder, task):
    _, few_shot, _ = _prompts(encoder, task, n=3)
    reads = []
    for p in few_shot:  # the plainest loop: one unpadded prompt, read the last position
        with (
            torch.no_grad(),
            edit_inputs(lm.layout.attn_out, torch.tensor([0]), torch.tensor([len(p.ids) - 1]), read=True) as sites,
        ):
            lm.model(input_ids=torch.tensor([p.ids]))
        reads.append(torch.stack([s.value[0] for s in sites]))  # [L, F]
    emb = head_means(Scorer(lm, encoder.label_ids, 3, quiet=True), few_shot, "t")
    torch.testing.assert_close(emb.reshape(lm.layout.n_layers, -1), torch.stack(reads).mean(0), atol=1e-5, rtol=1e-5)


def test_alpha_zero_is_the_plain_zero_shot_forward(lm, encoder, task):
    _, _, zero_shot = _prompts(encoder, task)
    scorer = Scorer(lm, encoder.label_ids, 5, quiet=True)
    batch = scorer.batch(zero_shot)
    site = _random_state(lm)
    site.logits = torch.full_like(site.logits, float("-inf"))  # alpha = 0 exactly
    torch.testing.assert_close(site.predict(scorer, batch), ICL().predict(scorer, batch), atol=0, rtol=0)
    site.logits = torch.zeros_like(site.logits)  # alpha = 0.5: the edit does something
    assert not torch.allclose(site.predict(scorer, batch), ICL().predict(scorer, batch), atol=1e-4)


def test_mixing_changes_only_the_last_positions_head_inputs_as_computed_by_hand(lm, encoder, task):
    _, _, zero_shot = _prompts(encoder, task, n=3)
    scorer = Scorer(lm, encoder.label_ids, 3, quiet=True)
    batch = scorer.batch(zero_shot)
    b, t = batch.input_ids.shape
    site = _random_state(lm, seed=1)
    alpha = torch.sigmoid(site.logits)
    every_r, every_c = torch.arange(b).repeat_interleave(t), torch.arange(t).repeat(b)
    modules = lm.layout.attn_out
    with edit_inputs(modules, every_r, every_c, read=True) as plain:
        scorer.forward(batch)
    # pre-hooks run in order: `before` sees the input the edit receives, `after` what it passes on
    with (
        edit_inputs(modules, every_r, every_c, read=True) as before,
        soft_injection(scorer, site.emb, alpha, torch.arange(b), batch.query_cols),
        edit_inputs(modules, every_r, every_c, read=True) as after,
    ):
        scorer.forward(batch)
    last = batch.query_cols
    assert bool((last == t - 1).all())
    for layer in range(lm.layout.n_layers):
        h0 = plain[layer].value.view(b, t, lm.layout.n_heads, -1)
        h = before[layer].value.view(b, t, lm.layout.n_heads, -1)
        out = after[layer].value.view(b, t, lm.layout.n_heads, -1)
        torch.testing.assert_close(out[:, :-1], h[:, :-1], atol=0, rtol=0)  # earlier positions untouched
        torch.testing.assert_close(h[:, :-1], h0[:, :-1], atol=1e-5, rtol=1e-5)  # and so is their context
        a = alpha[layer][None, :, None]  # [1, H, 1]
        expected = (1 - a) * h[:, -1] + a * site.emb[layer][None]
        torch.testing.assert_close(out[:, -1], expected, atol=1e-5, rtol=1e-5)


def test_gradient_of_the_loss_matches_a_finite_difference(lm, encoder, task):
    _, _, zero_shot = _prompts(encoder, task, n=4)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    batch = scorer.batch(zero_shot)
    site = _random_state(lm, seed=2)
    site.emb = site.emb * 3  # a large embedding: a clear slope
    logits = site.logits.clone().requires_grad_(True)
    with scorer.trainable():
        site._loss(scorer, batch, logits).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    eps = 1e-2
    with scorer.trainable():  # no torch.no_grad: differentiable_scores insists on autograd
        for layer, head in [(0, 0), (1, 2)]:
            up, down = logits.detach().clone(), logits.detach().clone()
            up[layer, head] += eps
            down[layer, head] -= eps
            slope = (site._loss(scorer, batch, up) - site._loss(scorer, batch, down)) / (2 * eps)
            assert abs(float(slope) - float(logits.grad[layer, head])) < 1e-2 * max(1.0, abs(float(slope)))


def test_optimisation_lowers_the_training_loss_and_changes_only_the_logits(lm, encoder, task):
    eps, few_shot, zero_shot = _prompts(encoder, task, n=8, seed=4)
    scorer = Scorer(lm, encoder.label_ids, 8, quiet=True)
    site = SoftInjection(site_steps=12, site_lr=0.3, site_batch=8, site_val_every=3)
    site.emb = head_means(scorer, few_shot, "t") * 4
    emb = site.emb.clone()
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    flags = [p.requires_grad for p in lm.model.parameters()]
    site.optimise(scorer, zero_shot, zero_shot, 2)  # validation = the training prompts: the kept one is the best seen
    with scorer.trainable():
        start = float(site._loss(scorer, scorer.batch(zero_shot), torch.zeros_like(site.logits)))
        end = float(site._loss(scorer, scorer.batch(zero_shot), site.logits))
    assert end < start - 1e-3
    assert site.loss_curve[-1] < site.loss_curve[0]
    assert [c["step"] for c in site.checkpoints] == [3, 6, 9, 12]
    assert site.chosen == min(site.checkpoints, key=lambda c: c["loss"])["step"]
    torch.testing.assert_close(site.emb, emb, atol=0, rtol=0)
    assert all(torch.equal(v, weights[k]) for k, v in lm.model.state_dict().items())
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    assert all(p.grad is None for p in lm.model.parameters())


@pytest.mark.parametrize("select,scripted,kept", [("loss", [3.0, 1.0, 2.0], 2), ("macro_f1", [0.5, 0.9, 0.9], 2)])
def test_the_best_checkpoint_on_validation_is_kept_not_the_last(gpt2, task, monkeypatch, select, scripted, kept):
    from ivlib.prompts import PromptEncoder

    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    _, few_shot, zero_shot = _prompts(encoder, task, n=4)
    scorer = Scorer(gpt2, encoder.label_ids, 4, quiet=True)
    site = SoftInjection(site_steps=6, site_val_every=2, site_select=select)
    site.emb = head_means(scorer, few_shot, "t")
    seen = []

    def scripted_validation(_scorer, _prompts, logits, _n_classes):  # the reference's bug kept the last of these
        seen.append(logits.detach().cpu().clone())
        value = scripted[len(seen) - 1]
        return {"loss": value, "macro_f1": 0.0} if select == "loss" else {"loss": 1.0, "macro_f1": value}

    monkeypatch.setattr(site, "validate", scripted_validation)
    site.optimise(scorer, zero_shot, zero_shot, 2)
    assert site.chosen == 2 * kept
    torch.testing.assert_close(site.logits, seen[kept - 1], atol=0, rtol=0)
    assert not torch.equal(site.logits, seen[-1])
    assert site.fit_summary()["chosen_step"] == 2 * kept


def test_fit_needs_validation_and_summary_lists_heads(gpt2, task):
    from ivlib.prompts import PromptEncoder

    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    train = sample_episodes(task.splits["train"], 2, 1, 4, 3, "train/extract")
    scorer = Scorer(gpt2, encoder.label_ids, 4, quiet=True)
    with pytest.raises(ValueError, match="validation"):
        SoftInjection(site_steps=2).fit(scorer, encoder, train)
    site = SoftInjection(site_steps=3, site_val_every=5)
    site.fit(scorer, encoder, train, sample_episodes(task.splits["validation"], 2, 1, 4, 3, "v"))
    summary = site.fit_summary()
    assert len(summary["loss_curve"]) == 3 and [c["step"] for c in summary["validation"]] == [3]
    alpha = torch.sigmoid(site.logits)
    assert summary["alpha"]["max"] == round(float(alpha.max()), 4) and len(summary["alpha"]["top_heads"]) == 8
    assert summary["alpha"]["top_heads"][0][2] == summary["alpha"]["max"]


def test_cli_record_has_the_fit_summary_and_reloads_to_the_same_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results, state = tmp_path / "runs.jsonl", tmp_path / "site.safetensors"
    assert main(CLI + ["--results", str(results), "--save-vectors", str(state)]) == 0
    assert main(CLI + ["--results", str(results), "--load-vectors", str(state)]) == 0
    fitted, loaded = [json.loads(line) for line in results.read_text().splitlines()]
    assert fitted["method"] == "site" and fitted["hyperparameters"]["shot"] == 0
    fit = fitted["fit"]
    assert len(fit["loss_curve"]) == 4 and [c["step"] for c in fit["validation"]] == [2, 4]
    assert fit["chosen_step"] in (2, 4) and fit["chosen_by"] == "loss"
    assert set(fit["alpha"]) == {"mean", "max", "above_half", "top_heads"}
    assert loaded["metrics"] == fitted["metrics"]
    assert loaded["fit"]["chosen_step"] == fit["chosen_step"] and loaded["fit"]["validation"] == fit["validation"]


@pytest.mark.parametrize(
    "flag,value", [("--site-lr", "0"), ("--site-steps", "0"), ("--site-select", "accuracy"), ("--site-init", "nan")]
)
def test_bad_settings_are_one_line_errors(tmp_path, capsys, flag, value):
    rc = main(CLI + ["--results", str(tmp_path / "r.jsonl"), flag, value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and flag in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists()
    with pytest.raises(UsageError, match="site-batch"):
        SoftInjection(site_batch=0)


def test_python_api_fits_and_evaluates(gpt2, task):
    site = ivlib.fit("site", gpt2, task, ext_shot=1, episodes=6, select_episodes=6, batch_size=4, site_steps=3)
    assert isinstance(site, SoftInjection) and site.fit_info is not None
    result = ivlib.evaluate(site, gpt2, task, n=10, batch_size=4)
    assert result.scores.shape == (10, 2) and all(len(e.demos) == 0 for e in result.episodes)
