"""I2CL: context vectors read from lone demonstrations, the b * out + a * v edit at every position,
and a calibration that learns a and b only, through the frozen model."""

import json
from pathlib import Path

import pytest
import torch

import ivlib
from ivlib.cli import main
from ivlib.episodes import Episode, sample_episodes
from ivlib.hooks import edit_outputs, stack_reads, watch_outputs
from ivlib.methods.i2cl import ImplicitICL, demo_prompt, demonstrations, lr_factor, site_modules
from ivlib.scoring import Scorer

REPO = Path(__file__).resolve().parent.parent
CLI = ["-c", "config/tiny.yaml", "-m", "tiny-llama", "-t", "review_sentiment", "--method", "i2cl"]
CLI += ["-s", "1", "-e", "3", "--i2cl-sets", "2", "-n", "20", "--i2cl-epochs", "3", "--batch-size", "4", "--quiet"]


def _train(task, episodes=3, shot=1):
    return sample_episodes(task.splits["train"], 2, shot, episodes, 5, "train/extract")


def _random_state(lm, seed=0):
    """A fitted-looking I2CL: random vectors and (a, b), so edits are visible on random tiny models."""
    g = torch.Generator().manual_seed(seed)
    n_layers, dim = lm.layout.n_layers, lm.layout.d_model
    method = ImplicitICL()
    method.load_state(
        {
            "vectors": torch.randn(n_layers, 2, dim, generator=g),
            "a": torch.rand(n_layers, 2, generator=g) + 0.5,
            "b": torch.rand(n_layers, 2, generator=g) + 0.5,
            "loss_curve": torch.zeros(1, dtype=torch.float64),
            "demonstrations": torch.tensor(1),
        }
    )
    return method


def _eval_batch(scorer, encoder, task, n=4):
    episodes = sample_episodes(task.splits["validation"], 2, 0, n, 7, "validation/eval")
    return scorer.batch([encoder.encode(e) for e in episodes])


def test_context_vectors_and_scores_batched_equal_one_at_a_time(lm, encoder, task):
    demos = demonstrations(_train(task, episodes=4, shot=2))
    method = _random_state(lm)
    episodes = sample_episodes(task.splits["validation"], 2, 0, 6, 7, "validation/eval")
    prompts = [encoder.encode(e) for e in episodes]
    vectors, scores = [], []
    for bs in (1, 4):
        scorer = Scorer(lm, encoder.label_ids, bs, quiet=True)
        vectors.append(method.context_vectors(scorer, encoder, demos))
        scores.append(scorer.runner.map(prompts, lambda b: method.predict(scorer, b), "t"))
    torch.testing.assert_close(vectors[0], vectors[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)
    assert vectors[0].shape == (lm.layout.n_layers, 2, lm.layout.d_model)


def test_context_vectors_are_the_mean_of_lone_demonstrations_at_their_last_token(lm, encoder, task):
    demos = demonstrations(_train(task, episodes=2, shot=2))
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    modules = site_modules(lm.layout)
    reads = []
    for demo in demos:  # the plain loop: one unpadded forward per demonstration
        ids = torch.tensor([demo_prompt(encoder, demo).ids])
        with (
            torch.no_grad(),
            edit_outputs(modules, torch.tensor([0]), torch.tensor([ids.shape[1] - 1]), read=True) as s,
        ):
            lm.model(input_ids=ids)
        reads.append(stack_reads(s)[:, 0].view(lm.layout.n_layers, 2, -1))
    expected = torch.stack(reads).mean(dim=0)
    torch.testing.assert_close(ImplicitICL().context_vectors(scorer, encoder, demos), expected, atol=1e-5, rtol=1e-5)
    text = lm.tokenizer.decode(demo_prompt(encoder, demos[0]).ids)
    assert text.endswith(task.label_words[demos[0].label] + "\n\n\n")  # the answer and separator are read


def test_identity_coefficients_leave_the_forward_exactly_unchanged(lm, encoder, task):
    method = _random_state(lm)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    batch = _eval_batch(scorer, encoder, task)
    n = lm.layout.n_layers
    with torch.inference_mode():
        plain = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        with method.injected(lm.layout, torch.zeros(n, 2), torch.ones(n, 2)):
            same = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        with method.injected(lm.layout, method.a, method.b):
            edited = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(plain, same)
    assert not torch.allclose(plain, edited, atol=1e-3)


def test_every_position_of_every_site_becomes_b_out_plus_a_v(lm, encoder, task):
    method = _random_state(lm, seed=3)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    batch = _eval_batch(scorer, encoder, task)
    modules = site_modules(lm.layout)
    raw, after = {}, {}
    with (  # hooks run in the order they are installed: `raw` before the edit, `after` after it
        torch.inference_mode(),
        watch_outputs(modules, lambda i, h: raw.__setitem__(i, h.clone())),
        method.injected(lm.layout, method.a, method.b),
        watch_outputs(modules, lambda i, h: after.__setitem__(i, h.clone())),
    ):
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert len(raw) == len(after) == 2 * lm.layout.n_layers
    for i in range(len(modules)):
        layer, site = divmod(i, 2)
        expected = method.b[layer, site] * raw[i] + method.a[layer, site] * method.vectors[layer, site]
        torch.testing.assert_close(after[i], expected, atol=1e-6, rtol=1e-6)


def test_calibration_noise_is_its_scale_times_each_positions_norm(gpt2, task):
    from ivlib.prompts import PromptEncoder

    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    method = _random_state(gpt2, seed=5)
    scorer = Scorer(gpt2, encoder.label_ids, 4, quiet=True)
    batch = _eval_batch(scorer, encoder, task)
    modules = site_modules(gpt2.layout)
    n = gpt2.layout.n_layers
    raw, after = {}, {}
    with (
        torch.inference_mode(),
        watch_outputs(modules, lambda i, h: raw.__setitem__(i, h.clone())),
        method.injected(gpt2.layout, torch.zeros(n, 2), torch.ones(n, 2), 0.5, torch.Generator().manual_seed(9)),
        watch_outputs(modules, lambda i, h: after.__setitem__(i, h.clone())),
    ):
        gpt2.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    draws = torch.Generator().manual_seed(9)  # the sites draw in forward order: attn 0, mlp 0, attn 1, ...
    for i in range(len(modules)):
        noise = torch.randn(raw[i].shape, generator=draws)
        expected = raw[i] + 0.5 * raw[i].norm(dim=-1, keepdim=True) * noise
        torch.testing.assert_close(after[i], expected, atol=1e-5, rtol=1e-5)


def _label_loss(method, scorer, encoder, demos):
    batch = scorer.batch([encoder.encode(Episode((), d)) for d in demos])
    scores = method.predict(scorer, batch)
    return float(-scores.gather(1, batch.labels[:, None]).mean())


def test_calibration_lowers_the_training_loss_and_changes_only_a_and_b(lm, encoder, task):
    train = _train(task, episodes=3, shot=2)
    demos = demonstrations(train)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    flags = [p.requires_grad for p in lm.model.parameters()]
    method = ImplicitICL(i2cl_sets=3, i2cl_epochs=8, i2cl_lr=0.05, i2cl_noise=0.0, seed=1)
    method.fit(scorer, encoder, train)
    start = ImplicitICL()
    start.vectors = method.vectors
    n = lm.layout.n_layers
    start.a, start.b = torch.full((n, 2), 0.1), torch.ones(n, 2)
    assert _label_loss(method, scorer, encoder, demos) < _label_loss(start, scorer, encoder, demos)
    assert method.loss_curve[-1] < method.loss_curve[0] and len(method.loss_curve) == 8
    assert not torch.equal(method.a, start.a) and not torch.equal(method.b, start.b)
    # the vectors are the demonstrations' own, untouched by the calibration; the model is unchanged
    torch.testing.assert_close(method.vectors, ImplicitICL().context_vectors(scorer, encoder, demos))
    assert all(torch.equal(v, weights[k]) for k, v in lm.model.state_dict().items())
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    assert all(p.grad is None for p in lm.model.parameters())


def test_calibration_is_deterministic_for_a_seed_and_noise_depends_on_it(gpt2, task):
    from ivlib.prompts import PromptEncoder

    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    train = _train(task)
    fits = []
    for seed in (4, 4, 5):
        method = ImplicitICL(i2cl_epochs=2, seed=seed)
        method.fit(Scorer(gpt2, encoder.label_ids, 4, quiet=True), encoder, train)
        fits.append(method)
    assert torch.equal(fits[0].a, fits[1].a) and torch.equal(fits[0].b, fits[1].b)
    assert not torch.equal(fits[0].a, fits[2].a)  # order and noise come from the run's seed


def test_learning_rate_schedule_warms_up_then_follows_the_cosine():
    assert lr_factor(0, 10, 100) == 0 and lr_factor(5, 10, 100) == 0.5 and lr_factor(10, 10, 100) == 1.0
    assert lr_factor(11, 10, 100) == pytest.approx((1 + torch.cos(torch.tensor(torch.pi * 0.11)).item()) / 2)
    assert lr_factor(0, 0, 4) == 1.0 and lr_factor(4, 0, 4) == pytest.approx(0.0)  # no warm-up: cosine alone


def test_demonstrations_are_distinct_in_first_appearance_order(task):
    train = _train(task, episodes=6, shot=2)
    demos = demonstrations(train)
    flat = [d for e in train for d in e.demos]
    assert len(demos) == len(set(flat)) and demos[0] == flat[0]
    assert all(d in demos for d in flat)


def test_cli_records_the_fit_and_saved_vectors_reproduce_it(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results, state = tmp_path / "runs.jsonl", tmp_path / "i2cl.safetensors"
    assert main(CLI + ["--results", str(results), "--save-vectors", str(state)]) == 0
    assert main(CLI + ["--results", str(results), "--load-vectors", str(state)]) == 0
    fitted, loaded = [json.loads(line) for line in results.read_text().splitlines()]
    fit = fitted["fit"]
    assert fitted["method"] == "i2cl" and fitted["hyperparameters"]["shot"] == 0
    assert (
        fitted["hyperparameters"]["i2cl_sets"] == 2
        and fitted["hyperparameters"]["i2cl_epochs"] == 3
        and fitted["hyperparameters"]["i2cl_lr"] == 0.01
    )
    assert len(fit["loss_curve"]) == 3 and fit["demonstrations"] == len(demos_of_cli())
    assert set(fit["a"]) == set(fit["b"]) == {"attn", "mlp"} and len(fit["a"]["mlp"]) == 2
    assert loaded["metrics"] == fitted["metrics"]
    assert loaded["fit"]["loaded_from"] == str(state) and loaded["fit"]["a"] == fit["a"]
    assert loaded["fit"]["loss_curve"] == fit["loss_curve"]


def demos_of_cli():
    """The distinct demonstrations of the CLI test's first two fit episodes (-s 1 -e 3 --i2cl-sets 2, seed 42)."""
    task = ivlib.load_task("review_sentiment")
    return demonstrations(sample_episodes(task.splits["train"], 2, 1, 3, 42, "train/extract")[:2])


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--i2cl-epochs", "0"], "--i2cl-epochs 0 is out of range; accepted: an integer >= 1"),
        (["--i2cl-batch", "0"], "--i2cl-batch 0 is out of range"),
        (["--i2cl-lr", "-1"], "--i2cl-lr -1"),
        (["--i2cl-noise", "nan"], "--i2cl-noise nan is not a finite number"),
        (["--i2cl-init-a", "x"], "--i2cl-init-a 'x' is not accepted; accepted: a finite number"),
        (["-s", "0"], "--ext-shot 0"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, monkeypatch, capsys, flags, named):
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    rc = main(CLI + flags + ["--results", str(results)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and named in err[0]
    assert not results.exists()


def test_python_api_fits_and_evaluates():
    lm = ivlib.wrap(*ivlib.tiny_model("llama"), name="tiny-llama")
    task = ivlib.load_task("review_sentiment")
    method = ivlib.fit("i2cl", lm, task, ext_shot=1, episodes=3, batch_size=4, i2cl_epochs=2)
    assert method.fit_info is not None and len(method.fit_info["loss_curve"]) == 2
    result = ivlib.evaluate(method, lm, task, n=10, batch_size=4)
    assert result.scores.shape == (10, 2) and torch.isfinite(result.scores).all()
    with pytest.raises(ivlib.UsageError, match="i2cl-epochs 0"):
        ivlib.fit("i2cl", lm, task, i2cl_epochs=0)
