"""Issue 29 item 2: a state file knows the model it was fitted on (architecture and sampled weights),
so a file fitted on another model registered under the same name is refused in one line naming both;
fit settings read from a file pass the checks their flags pass; malformed metadata is one line.
Files written before fingerprints existed still load for the same name, with the older checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ivlib
from ivlib.cli import main
from ivlib.fingerprint import model_fingerprint, same_model
from ivlib.state import FINGERPRINT_KEY

REPO = Path(__file__).resolve().parent.parent
COMMON = ["-t", "review_sentiment", "-n", "12", "--quiet", "--batch-size", "8"]
FIT = ["-s", "1", "-e", "4"]


def _registry(tmp_path: Path, builtin: str) -> str:
    """A config registering the name 'mine' as `builtin` (the same name, another model each time)."""
    path = tmp_path / f"mine-{builtin}.yaml"
    path.write_text(f"models:\n  mine: {{builtin: {builtin}}}\n")
    return str(path)


def _rewrite(src: Path, dst: Path, **changes) -> Path:
    """A copy of a state file with metadata keys replaced (None: removed), tensors unchanged."""
    with safe_open(str(src), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(tensors, str(dst), metadata={k: json.dumps(v) for k, v in meta.items()})
    return dst


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """IV fitted on tiny-gpt2, registered as 'mine', saved by --save-vectors."""
    tmp = tmp_path_factory.mktemp("state")
    vectors = tmp / "iv.safetensors"
    argv = ["-c", _registry(tmp, "tiny-gpt2"), "-m", "mine", *COMMON, *FIT]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        assert main(argv + ["--results", str(tmp / "fit.jsonl"), "--save-vectors", str(vectors)]) == 0
    return vectors


def _load(tmp_path: Path, vectors: Path, builtin: str, capsys, monkeypatch, *extra: str) -> tuple[int, str, Path]:
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    capsys.readouterr()
    argv = ["-c", _registry(tmp_path, builtin), "-m", "mine", *COMMON, *extra]
    code = main(argv + ["--results", str(results), "--load-vectors", str(vectors)])
    return code, capsys.readouterr().err.strip(), results


def test_the_file_records_the_model_it_was_fitted_on(saved):
    with safe_open(str(saved), framework="pt") as f:
        fingerprint = json.loads(f.metadata()[FINGERPRINT_KEY])
    arch = fingerprint["architecture"]
    assert arch["model_type"] == "gpt2" and arch["n_layers"] == 2 and arch["d_model"] == 64 and arch["n_heads"] == 4
    assert set(fingerprint["weights"]) == {"embedding", "first_block", "last_block"}
    assert all(len(w["values"]) == 16 and w["dtype"] == "float32" for w in fingerprint["weights"].values())


def test_another_architecture_under_the_same_name_is_refused_naming_both(saved, tmp_path, capsys, monkeypatch):
    """tiny-gpt2 and tiny-llama have the same depth and width, so IV's vectors have the same shape:
    before fingerprints such a file loaded silently into the other model."""
    code, err, results = _load(tmp_path, saved, "tiny-llama", capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "another model registered as 'mine'" in err and "gpt2, 2 layers" in err and "llama, 2 layers" in err
    assert not results.exists()


def test_the_same_model_loads(saved, tmp_path, capsys, monkeypatch):
    code, err, results = _load(tmp_path, saved, "tiny-gpt2", capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(results.read_text())["fit"]["loaded_from"] == str(saved)


def test_a_file_written_before_fingerprints_loads_with_the_older_checks(saved, tmp_path, capsys, monkeypatch):
    """Accepted (the lead's choice): an old file for the same name has always been trusted on its name,
    layers and width; refusing it now would break saved work that is most likely right."""
    old = _rewrite(saved, tmp_path / "old.safetensors", **{FINGERPRINT_KEY: None})
    code, err, _ = _load(tmp_path, old, "tiny-gpt2", capsys, monkeypatch)
    assert code == 0, err


@pytest.mark.parametrize(
    "fit_change, named",
    [
        ({"ext_shot": -5}, "ext_shot=-5"),
        ({"episodes": "lots"}, "episodes='lots'"),
        ({"ext_strength": float("nan")}, "ext_strength=nan"),
        ({"ext_batch": True}, "ext_batch=True"),
    ],
)
def test_fit_settings_from_a_file_pass_the_checks_of_their_flags(
    saved, tmp_path, capsys, monkeypatch, fit_change, named
):
    with safe_open(str(saved), framework="pt") as f:
        fit = json.loads(f.metadata()["fit"])
    bad = _rewrite(saved, tmp_path / "bad.safetensors", fit={**fit, **fit_change})
    code, err, results = _load(tmp_path, bad, "tiny-gpt2", capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert named in err and "accepted:" in err
    assert not results.exists()


@pytest.mark.parametrize("fit", ["a string", [1, 2], 7])
def test_fit_metadata_that_is_not_a_mapping_is_one_line(saved, tmp_path, capsys, monkeypatch, fit):
    bad = _rewrite(saved, tmp_path / "bad.safetensors", fit=fit)
    code, err, results = _load(tmp_path, bad, "tiny-gpt2", capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "not a mapping" in err and not results.exists()


@pytest.mark.parametrize("fingerprint", ["gpt2", {"architecture": {}, "weights": {"embedding": {"values": "x"}}}])
def test_a_malformed_fingerprint_is_one_line(saved, tmp_path, capsys, monkeypatch, fingerprint):
    bad = _rewrite(saved, tmp_path / "bad.safetensors", **{FINGERPRINT_KEY: fingerprint})
    code, err, _ = _load(tmp_path, bad, "tiny-gpt2", capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1 and FINGERPRINT_KEY in err, err


# ---- the Python API: same architecture, other weights; the same weights in another dtype ---------------
@pytest.fixture(scope="module")
def api_state(tmp_path_factory):
    task = ivlib.load_task("review_sentiment")
    lm = ivlib.wrap(*ivlib.tiny_model("gpt2", seed=0), name="mine")
    path = tmp_path_factory.mktemp("api") / "iv.safetensors"
    ivlib.save(ivlib.fit("iv", lm, task, ext_shot=1, episodes=4, batch_size=8), str(path), lm, task)
    return task, path


def test_api_refuses_a_file_fitted_on_other_weights_of_the_same_architecture(api_state):
    task, path = api_state
    other = ivlib.wrap(*ivlib.tiny_model("gpt2", seed=1), name="mine")  # another seed: a "fine-tune"
    with pytest.raises(ivlib.UsageError, match="another model registered as 'mine'") as err:
        ivlib.load(str(path), other, task)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_api_loads_the_file_into_the_same_weights_in_half_precision(api_state, dtype):
    task, path = api_state
    model, tokenizer = ivlib.tiny_model("gpt2", seed=0)
    half = ivlib.wrap(model.to(dtype), tokenizer, name="mine")
    method = ivlib.load(str(path), half, task)
    assert method.fit_info["ext_shot"] == 1


def test_api_load_checks_the_file_fit_settings(api_state, tmp_path):
    task, path = api_state
    lm = ivlib.wrap(*ivlib.tiny_model("gpt2", seed=0), name="mine")
    with safe_open(str(path), framework="pt") as f:
        fit = json.loads(f.metadata()["fit"])
    for change in ({"ext_strength": "strong"}, {"seed": -1}):
        bad = _rewrite(path, tmp_path / "bad.safetensors", fit={**fit, **change})
        with pytest.raises(ivlib.UsageError, match="which a flag would not pass"):
            ivlib.load(str(bad), lm, task)


def test_fingerprints_tell_weights_apart_but_not_their_rounding():
    base = ivlib.wrap(*ivlib.tiny_model("llama", seed=0))
    fp32 = model_fingerprint(base)
    assert same_model(fp32, model_fingerprint(base))
    for dtype in (torch.bfloat16, torch.float16):
        model, tok = ivlib.tiny_model("llama", seed=0)
        assert same_model(fp32, model_fingerprint(ivlib.wrap(model.to(dtype), tok)))
    model, tok = ivlib.tiny_model("llama", seed=0)
    with torch.no_grad():
        layer = model.model.layers[-1].self_attn.q_proj.weight
        layer.mul_(1.01)  # 1% on one matrix of the last block: more than any rounding
    assert not same_model(fp32, model_fingerprint(ivlib.wrap(model, tok)))
