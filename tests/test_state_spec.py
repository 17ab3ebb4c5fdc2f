"""A fitted-state file that does not fit the model or task is refused with one line, before a record:
each method's `state_spec` (names, shapes, dtypes, ranges) and the file's own metadata are checked."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ivlib.cli import main
from ivlib.layout import ModelLayout
from ivlib.methods import METHODS
from ivlib.state import TENSORS_KEY, TensorSpec, check_tensors

REPO = Path(__file__).resolve().parent.parent
GOOD = ["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "-e", "4", "-n", "8", "--quiet"]

FIT = {
    "iv": ["-s", "1"],
    "tv": ["-s", "1", "--select-episodes", "4"],
    "fv": ["-s", "1", "--ie-episodes", "2"],
    "sv": ["-s", "1", "--select-episodes", "4"],
    "i2cl": ["-s", "1", "-e", "2", "--i2cl-epochs", "2"],
    "site": ["-s", "1", "--select-episodes", "4", "--site-steps", "2", "--site-val-every", "1"],
}


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """One fitted state per method with state, on tiny-gpt2 and review_sentiment."""
    folder = tmp_path_factory.mktemp("states")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        for method, extra in FIT.items():
            path = folder / f"{method}.safetensors"
            argv = GOOD + ["--method", method, *extra, "--save-vectors", str(path)]
            assert main(argv + ["--results", str(folder / "fit.jsonl")]) == 0
            out[method] = path
    return out


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _rewrite(src, dest, edit, keep_table=False):
    """The file with its tensors edited; its metadata's tensor table rewritten to agree, unless kept."""
    tensors, meta = _read(src)
    tensors = edit(dict(tensors))
    if not keep_table:
        meta[TENSORS_KEY] = json.dumps(
            {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sorted(tensors.items())}
        )
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest), metadata=meta)
    return dest


def _put(name, value):
    def edit(t):
        t[name] = value(t[name]) if callable(value) else value
        return t

    return edit


def _drop(name):
    def edit(t):
        del t[name]
        return t

    return edit


CASES = {
    "iv vectors of another layer count": ("iv", _put("vectors", lambda v: v[:-1]), "has shape [1, 3, 64]"),
    "iv vectors of another width": ("iv", _put("vectors", lambda v: v[..., :32]), "need [2, 3, 64]"),
    "iv vectors as integers": ("iv", _put("vectors", lambda v: v.long()), "accepted: a floating-point tensor"),
    "iv vectors with a NaN": (
        "iv",
        _put("vectors", lambda v: v.index_fill(0, torch.tensor([0]), float("nan"))),
        "non-finite",
    ),
    "iv vectors renamed": ("iv", lambda t: {"vecs": t["vectors"]}, "lacks tensor 'vectors'"),
    "iv with an extra tensor": ("iv", lambda t: {**t, "extra": torch.zeros(1)}, "tensor 'extra' that iv does not use"),
    "tv layer outside the model": ("tv", _put("layer", torch.tensor(99)), "holds 99, outside this model's range"),
    "tv negative layer": ("tv", _put("layer", torch.tensor(-1)), "accepted: 0..1"),
    "tv layer as a float": ("tv", _put("layer", torch.tensor(1.0)), "accepted: an integer tensor"),
    "tv theta transposed": ("tv", _put("theta", lambda v: v.T.contiguous()), "tensor 'theta' has shape [64, 2]"),
    "tv without layer scores": ("tv", _drop("layer_scores"), "lacks tensor 'layer_scores'"),
    "fv head outside the model": (
        "fv",
        _put("heads", lambda h: h.index_fill(1, torch.tensor([1]), 50)),
        "(column 1) holds 50",
    ),
    "fv vector of another width": ("fv", _put("vector", lambda v: v[:10]), "tensor 'vector' has shape [10]"),
    "sv more layers than the model": ("sv", _put("layers", torch.tensor(3)), "holds 3, outside this model's range"),
    "sv vector of another width": ("sv", _put("vector", lambda v: v[:, :10]), "tensor 'vector' has shape [2, 10]"),
    "i2cl one site only": ("i2cl", _put("vectors", lambda v: v[:, :1]), "tensor 'vectors' has shape [2, 1, 64]"),
    "i2cl a as integers": ("i2cl", _put("a", lambda v: v.long()), "accepted: a floating-point tensor"),
    "i2cl b with a NaN": ("i2cl", _put("b", lambda v: v.index_fill(0, torch.tensor([0]), float("nan"))), "non-finite"),
    "site embedding of another head size": ("site", _put("emb", lambda v: v[..., :8]), "tensor 'emb' has shape"),
    "site weights of another head count": ("site", _put("logits", lambda v: v[:, :2]), "tensor 'logits' has shape"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_state_that_does_not_fit_is_refused_with_one_line(case, states, tmp_path, monkeypatch, capsys):
    method, edit, needle = CASES[case]
    monkeypatch.chdir(REPO)
    bad = _rewrite(states[method], tmp_path / "bad.safetensors", edit)
    results = tmp_path / "runs.jsonl"
    results.write_text('{"earlier": "record"}\n')
    before = results.read_bytes()
    capsys.readouterr()
    code = main(GOOD + ["--method", method, *FIT[method], "--load-vectors", str(bad), "--results", str(results)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and needle in err, err
    assert results.read_bytes() == before


def test_a_file_whose_tensors_disagree_with_its_own_metadata_is_refused(states, tmp_path, monkeypatch, capsys):
    """Shapes that still fit the model (here the same shape, another dtype) but not what was saved."""
    monkeypatch.chdir(REPO)
    bad = _rewrite(states["iv"], tmp_path / "bad.safetensors", _put("vectors", lambda v: v.double()), keep_table=True)
    code = main(GOOD + ["-s", "1", "--load-vectors", str(bad), "--results", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "disagree with its own metadata (tensor 'vectors'" in err, err
    assert not (tmp_path / "r.jsonl").exists()


def test_the_saved_states_pass_their_own_spec(states):
    layout = ModelLayout([None, None], [torch.nn.Linear(64, 64)] * 2, "h", "attn.c_proj", 4, 4, 64)  # as tiny-gpt2
    for method, path in states.items():
        tensors, _ = _read(path)
        spec = METHODS[method].state_spec(layout, 2)
        assert spec is not None and set(spec) == set(tensors)
        check_tensors(str(path), tensors, spec, method)  # raises if not


def test_a_method_without_a_spec_still_loads_and_its_failures_are_one_line(states, tmp_path, monkeypatch, capsys):
    """Methods added without `state_spec` (None) load as before; a KeyError in load_state is one line."""
    from ivlib.methods.iv import IterativeVectors

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(IterativeVectors, "state_spec", classmethod(lambda cls, layout, n: None))
    results = tmp_path / "r.jsonl"
    assert main(GOOD + ["-s", "1", "--load-vectors", str(states["iv"]), "--results", str(results)]) == 0
    capsys.readouterr()  # the run's own output (the tiny task's cross-split duplicates warning)
    bad = _rewrite(states["iv"], tmp_path / "bad.safetensors", lambda t: {"vecs": t["vectors"]})
    code = main(GOOD + ["-s", "1", "--load-vectors", str(bad), "--results", str(results)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not fit method iv (KeyError" in err[0], err


def test_spec_checks_each_axis_kind_and_range():
    spec = {"x": TensorSpec((2, None)), "i": TensorSpec((None, 2), "int", below=(3, 4))}
    check_tensors("f", {"x": torch.zeros(2, 7), "i": torch.tensor([[2, 3]])}, spec, "m")
    with pytest.raises(Exception, match=r"holds 4"):
        check_tensors("f", {"x": torch.zeros(2, 7), "i": torch.tensor([[2, 4]])}, spec, "m")
    with pytest.raises(Exception, match=r"need \[2, any\]"):
        check_tensors("f", {"x": torch.zeros(3, 7), "i": torch.tensor([[0, 0]])}, spec, "m")


def test_the_python_api_checks_a_loaded_state_the_same_way(states, tmp_path):
    import ivlib

    model, tokenizer = ivlib.tiny_model("gpt2")
    lm = ivlib.wrap(model, tokenizer, name="tiny-gpt2")
    task = ivlib.load_task("review_sentiment")
    assert ivlib.load(str(states["tv"]), lm, task).layer in (0, 1)  # the file as saved loads
    bad = _rewrite(states["tv"], tmp_path / "bad.safetensors", _put("layer", torch.tensor(7)))
    with pytest.raises(ivlib.UsageError, match=r"tensor 'layer' holds 7, outside this model's range"):
        ivlib.load(str(bad), lm, task)
