"""The Python API (ivlib.api): in-memory models, tasks from lists, fit/evaluate/save/load agreeing with
the CLI, and steering a model's own forward and generate with a context manager."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ivlib
from ivlib.cli import main
from ivlib.episodes import sample_episodes as raw_sample
from ivlib.experiment import Experiment, RunSpec
from ivlib.layout import discover_layout
from ivlib.scoring import Scorer

REPO = Path(__file__).resolve().parent.parent
CLI = ["-c", "config/tiny.yaml", "-t", "review_sentiment", "-s", "1", "-e", "6", "-n", "30", "--quiet"]
CLI += ["--batch-size", "8", "--select-episodes", "20"]
FIT = dict(ext_shot=1, episodes=6, select_episodes=20, batch_size=8)  # the same settings, API spelling
STEERING = ("iv", "tv", "fv")


@pytest.fixture(scope="module")
def task():
    return ivlib.load_task("review_sentiment")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request):
    return ivlib.wrap(*ivlib.tiny_model(request.param), name=f"tiny-{request.param}")


@pytest.fixture(scope="module")
def gpt2():
    return ivlib.wrap(*ivlib.tiny_model("gpt2"), name="tiny-gpt2")


@pytest.fixture(scope="module")
def fitted(lm, task):
    return {name: ivlib.fit(name, lm, task, **FIT) for name in STEERING}


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _plain(metrics):
    return json.loads(json.dumps(metrics))  # as a record holds them (tuples become lists)


def _prompt(lm, task, shots=2, index=0):
    val = task.splits["validation"]
    demos = [(val.texts[index + i], int(val.labels[index + i])) for i in range(shots)]
    return ivlib.encode(lm, task, demos=demos, query=val.texts[index + shots])


def _no_hooks(lm):
    modules = [lm.model, *lm.layout.blocks, *lm.layout.attn_out]
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


# ---- 1. models --------------------------------------------------------------------------------
def test_wrap_reads_the_model_and_discovers_its_layout():
    model, tok = ivlib.tiny_model("llama")
    lm = ivlib.wrap(model, tok, name="mine")
    assert lm.name == "mine" and lm.model is model and lm.tokenizer is tok
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32 and lm.add_bos is True
    assert lm.layout.describe() == discover_layout(model).describe()
    assert ivlib.wrap(model, tok, add_bos=False).add_bos is False
    with pytest.raises(ivlib.UsageError, match="add_bos"):
        ivlib.wrap(model, tok, add_bos="yes")


# ---- 2. tasks ---------------------------------------------------------------------------------
def test_tasks_from_the_registry_and_from_lists():
    task = ivlib.load_task("review_sentiment")
    assert task.name == "review_sentiment" and task.label_words == ["bad", "good"]
    with pytest.raises(ivlib.UsageError, match="unknown task"):
        ivlib.load_task("no_such_task")

    texts = [f"text number {i}" for i in range(50)]
    labels = [i % 2 for i in range(50)]
    made = ivlib.task_from_lists(["bad", "good"], train=(texts, labels), test=(["a b", "c d"], ["good", 0]), name="t")
    assert made.name == "t" and set(made.splits) == {"train", "validation", "test"}
    assert len(made.splits["train"].texts) == 40 and len(made.splits["validation"].texts) == 10  # carved 80/20
    assert made.splits["test"].labels.tolist() == [1, 0]

    bad = [
        (dict(train=(texts, labels[:-1])), "49 labels"),
        (dict(train=(texts, [2] * 50)), "out of range"),
        (dict(train=(texts, ["meh"] * 50)), "not a label word"),
        (dict(train=(["ok", " "], [0, 1])), "empty"),
        (dict(train=(texts, labels), validation=([], [])), "no examples"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ivlib.UsageError, match=message):
            ivlib.task_from_lists(["bad", "good"], **kwargs)
    with pytest.raises(ivlib.UsageError, match="distinct"):
        ivlib.task_from_lists(["x", "x"], train=(texts, labels))


# ---- 3. episodes ------------------------------------------------------------------------------
def test_episodes_come_from_the_cli_streams(task):
    spec = RunSpec(model="tiny-gpt2", task="review_sentiment", ext_shot=2, episodes=7, select_episodes=5, method="tv")
    run = Experiment(spec)
    run.task = task
    train, select = run.fit_episodes()
    assert ivlib.sample_episodes(task, "train", shot=2, n=7) == train
    assert ivlib.sample_episodes(task, "validation", shot=1, n=5, stream="select") == select
    assert ivlib.sample_episodes(task, "validation", shot=1, n=9, seed=3) == raw_sample(
        task.splits["validation"], 2, 1, 9, 3, "validation/eval"
    )
    with pytest.raises(ivlib.UsageError, match="split"):
        ivlib.sample_episodes(task, "dev")


# ---- 4-6. fit, evaluate, save and load agree with the CLI --------------------------------------
@pytest.mark.parametrize("name", STEERING)
def test_fit_evaluate_save_and_load_match_the_cli(name, gpt2, task, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results, cli_file, api_file = tmp_path / "runs.jsonl", tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    flags = CLI + ["-m", "tiny-gpt2", "--method", name, "--results", str(results)]
    assert main(flags + ["--save-vectors", str(cli_file)]) == 0
    (record,) = _records(results)

    method = ivlib.fit(name, gpt2, task, **FIT)  # the same episodes and fit: identical tensors
    cli_state = load_file(str(cli_file))
    assert set(method.state()) == set(cli_state)
    for key, tensor in method.state().items():
        assert torch.equal(tensor.cpu(), cli_state[key]), key
    assert _plain(method.fit_info) == {k: v for k, v in record["fit"].items() if not k.startswith("shared_by")}

    result = ivlib.evaluate(method, gpt2, task, split="validation", shot=1, n=30, batch_size=8)
    assert _plain(result.metrics) == record["metrics"]
    assert result.scores.shape == (30, 2) and result.predictions.shape == result.labels.shape == (30,)
    assert (result.predictions == result.scores.argmax(-1).numpy()).all()

    # a CLI file loads in the API, and an API file in the CLI: the same metrics either way
    loaded = ivlib.load(str(cli_file), gpt2, task)
    assert type(loaded) is type(method)
    assert _plain(ivlib.evaluate(loaded, gpt2, task, n=30, batch_size=8).metrics) == record["metrics"]
    ivlib.save(method, str(api_file), gpt2, task)
    assert main(flags + ["--load-vectors", str(api_file)]) == 0
    assert _records(results)[1]["metrics"] == record["metrics"]
    with pytest.raises(ivlib.UsageError, match="model='tiny-gpt2'"):
        ivlib.load(str(api_file), ivlib.wrap(*ivlib.tiny_model("gpt2"), name="other"), task)


def test_fit_accepts_a_built_method_and_refuses_bad_settings(gpt2, task):
    built = ivlib.get_method("iv")(strength=0.5, ext_batch=2)
    assert ivlib.fit(built, gpt2, task, **FIT) is built and built.vectors is not None
    stronger = ivlib.evaluate(built, gpt2, task, n=20, batch_size=8, strength=2.0)
    plain = ivlib.evaluate(built, gpt2, task, n=20, batch_size=8)
    assert not torch.equal(stronger.scores, plain.scores) and built.strength == 0.5  # a copy was evaluated
    with pytest.raises(
        ivlib.UsageError, match="method=.nope. is not accepted; accepted: a registered method.s name .icl"
    ):
        ivlib.fit("nope", gpt2, task)
    with pytest.raises(ivlib.UsageError, match="no setting"):
        ivlib.fit("iv", gpt2, task, strenght=1.0)
    with pytest.raises(ivlib.UsageError, match="not fitted"):
        ivlib.evaluate("iv", gpt2, task, n=5)
    with pytest.raises(ivlib.UsageError, match="ext_shot"):
        ivlib.fit("iv", gpt2, task, ext_shot=0)
    assert ivlib.evaluate("icl", gpt2, task, n=10, batch_size=8).scores.shape == (10, 2)


# ---- 7. steering ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STEERING)
def test_steered_forward_equals_predict(name, lm, task, fitted):
    method = fitted[name]
    enc = ivlib.encoder(lm, task)
    scorer = Scorer(lm, enc.label_ids, 8)
    prompts = [_prompt(lm, task, shots=2), _prompt(lm, task, shots=4, index=5)]  # two lengths: left padding
    batch = ivlib.batch(lm, prompts)
    expected = method.predict(scorer, batch)
    plain = scorer.label_scores(batch)

    def label_logprobs(b):
        logits = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        return torch.log_softmax(logits[:, -1].float(), -1)[:, enc.label_ids]

    with torch.no_grad(), ivlib.steer(method, lm, prompts) as steered:
        assert torch.equal(steered.input_ids, batch.input_ids)
        got = label_logprobs(steered)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-7)  # the method did change something
    with torch.no_grad(), ivlib.steer(method, lm, prompts) as steered:  # rows repeated, as beams are: each copy
        twice = {
            k: getattr(steered, k).repeat_interleave(2, 0) for k in ("input_ids", "attention_mask", "position_ids")
        }
        repeated = lm.model(**twice).logits[:, -1]
        torch.testing.assert_close(
            torch.log_softmax(repeated.float(), -1)[:, enc.label_ids],
            expected.repeat_interleave(2, 0),
            rtol=1e-5,
            atol=1e-5,
        )
    assert _no_hooks(lm)
    with torch.no_grad():
        torch.testing.assert_close(label_logprobs(batch), plain, rtol=1e-5, atol=1e-5)


def _strong(method, name):
    """The tiny models are random: make the edit large enough to change greedy tokens (IV: strength)."""
    if name == "tv":
        method.theta = torch.randn(method.theta.shape, generator=torch.Generator().manual_seed(0)) * 5
    if name == "fv":
        method.vector = method.vector * 30
    return {"strength": 30.0} if name == "iv" else {}


@pytest.mark.parametrize("name", STEERING)
def test_steered_generate_edits_the_prompt_in_the_prefill_only(name, lm, task):
    method = ivlib.fit(name, lm, task, **FIT)
    settings = _strong(method, name)
    prompt = _prompt(lm, task)
    ids = torch.tensor([prompt.ids])

    def generate():
        out = lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=5,
            pad_token_id=lm.tokenizer.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        return out.sequences, torch.stack(out.scores, 1)[0]  # [5, V]

    before, _ = generate()
    with ivlib.steer(method, lm, prompt, **settings):
        steered, scores = generate()
        # with the cache, each step sees the edited prefix and is not edited itself: the same as full
        # forwards (no cache) over prompt + generated tokens, where only the prompt's positions are edited
        with torch.no_grad():
            full = lm.model(steered[:, :-1]).logits[0, len(prompt.ids) - 1 :]
        torch.testing.assert_close(scores, full, rtol=1e-4, atol=1e-4)
    after, _ = generate()
    assert not torch.equal(steered, before)
    assert torch.equal(after, before) and _no_hooks(lm)


@pytest.mark.parametrize("name", ["iv", "fv"])
def test_every_position_steers_every_forward(name, lm, task):
    method = ivlib.fit(name, lm, task, **FIT)
    settings = _strong(method, name)
    ids = torch.tensor([_prompt(lm, task).ids])
    kwargs = dict(do_sample=False, max_new_tokens=5, pad_token_id=lm.tokenizer.pad_token_id)
    before = lm.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    with ivlib.steer(method, lm, every_position=True, **settings):
        steered = lm.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        with torch.no_grad():  # the steady vector at every position, also the generated ones
            full = lm.model(steered[:, :-1]).logits[0, -5:].argmax(-1)
    assert torch.equal(full, steered[0, -5:])
    assert not torch.equal(steered, before) and _no_hooks(lm)


def test_steering_refusals_and_hooks_removed_after_an_exception(gpt2, task):
    iv, tv = ivlib.fit("iv", gpt2, task, **FIT), ivlib.fit("tv", gpt2, task, **FIT)
    prompt = _prompt(gpt2, task)
    ids = torch.tensor([prompt.ids])
    with torch.no_grad():
        plain = gpt2.model(ids).logits
    with pytest.raises(RuntimeError, match="inside"):
        with ivlib.steer(iv, gpt2, prompt, strength=30.0):
            with torch.no_grad():
                assert not torch.allclose(gpt2.model(ids).logits, plain)
            raise RuntimeError("inside the block")
    assert _no_hooks(gpt2)
    with torch.no_grad():
        assert torch.equal(gpt2.model(ids).logits, plain)
    with pytest.raises(ivlib.UsageError, match="replaces a hidden state"):
        with ivlib.steer(tv, gpt2, every_position=True):
            pass
    with pytest.raises(ivlib.UsageError, match="does not steer"):
        with ivlib.steer(ivlib.get_method("icl")(), gpt2, prompt):
            pass
    with pytest.raises(ivlib.UsageError, match="not fitted"):
        with ivlib.steer(ivlib.get_method("iv")(), gpt2, prompt):
            pass
    with pytest.raises(ivlib.UsageError, match="needs a prompt"):
        with ivlib.steer(iv, gpt2):
            pass
    assert _no_hooks(gpt2)


def test_encode_marks_the_separators(gpt2, task):
    prompt = ivlib.encode(gpt2, task, demos=[("great film", "good"), ("dull plot", 0)], query="fine acting")
    assert prompt.sep_class == [1, 0, 2] and prompt.sep_pos[-1] == len(prompt.ids) - 1
    assert prompt.ids[0] == gpt2.tokenizer.bos_token_id
    text = gpt2.tokenizer.decode(prompt.ids[1:])
    assert text == "great film\ngood\n\n\ndull plot\nbad\n\n\nfine acting\n"
    with pytest.raises(ivlib.UsageError, match="label word"):
        ivlib.encode(gpt2, task, demos=[("x", "meh")], query="y")


# ---- 9. the README's example runs as written ----------------------------------------------------
def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)  # the example writes its state file in the working directory
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    # the example's own assert holds these; repeated here so that editing it out cannot pass silently
    assert not torch.equal(namespace["steered"], namespace["plain"])
    assert torch.equal(namespace["after"], namespace["plain"])
    assert not torch.equal(namespace["everywhere"], namespace["plain"])
