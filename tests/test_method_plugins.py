"""A method added as one file, with no other file touched, is known everywhere a method is named:
`--help`, `methods`, `ivlib.steer`'s messages, the model registry's schema, `select` and the
report's columns (in its declared position). Once as a file written into a copy of the package
(found by pkgutil, in a fresh process), once as an installed package's entry point (group
`ivlib.methods`), and a plugin that fails to load is one warning."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ivlib.cli import main
from ivlib.methods import ENTRY_POINTS, METHODS, PluginWarning, discover

REPO = Path(__file__).resolve().parent.parent

# A built-in-style method file: absolute imports, so the same text serves inside the package and in a plugin.
METHOD = '''
from dataclasses import dataclass

import torch

from ivlib.hooks import Edit, edit_outputs, stack_reads
from ivlib.methods import Method, register
from ivlib.settings import EVAL, MethodSettings, setting_field


@dataclass(frozen=True)
class ShiftSettings(MethodSettings):
    gain: float = setting_field(1.0, "scale of the added vector", role=EVAL, symbol="g")
    depth: float = setting_field(
        0.5, "edited block, as a fraction of the depth", low=0.0, high=1.0, model_default="shift_depth"
    )


@register
class Shift(Method[ShiftSettings]):
    """gain x the mean block output at the query separator of training prompts, added there."""

    name = "NAME"
    position = 25  # between icl (20) and tv (30)
    needs_fit = True
    has_state = True
    steers = ("prompt", "every_position")

    def fit(self, scorer, encoder, episodes, validation=None):
        block = self._block(scorer.lm)

        def read(batch):  # [B, D]: the block's output at each query's separator
            rows = torch.arange(batch.input_ids.shape[0])
            with edit_outputs([block], rows, batch.query_cols, read=True) as sites:
                scorer.forward(batch)
            return stack_reads(sites)[0]

        self.vector = scorer.runner.map([encoder.encode(e) for e in episodes], read, "NAME fit").mean(dim=0)

    def _block(self, lm):
        return lm.layout.blocks[round(self.settings.depth * (lm.layout.n_layers - 1))]

    def edit(self, lm, batch):
        vector = (self.settings.gain * self.vector).to(lm.device, lm.dtype)
        rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        return Edit([self._block(lm)], rows, batch.query_cols, add=[vector.expand(len(rows), -1)], steady=[vector])

    def predict(self, scorer, batch):
        with self.edit(scorer.lm, batch).apply():
            return scorer.label_scores(batch)

    def state(self):
        return {"vector": self.vector}

    def load_state(self, tensors):
        self.vector = tensors["vector"].float()
'''

# Run in a fresh process on the copy: every place a method is named, one after the other.
CHECKS = """
import contextlib, io, json, shlex, sys
from pathlib import Path

import ivlib
from ivlib.cli import main

assert Path(ivlib.__file__).parent == Path(sys.argv[1]) / "ivlib", ivlib.__file__
tmp, repo = Path(sys.argv[2]), Path(sys.argv[3])


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


code, listed, _ = run(["methods"])
assert code == 0 and listed.split()[:4] == ["zero-shot", "icl", "file-shift", "tv"], listed
code, helped, _ = run(["--help"])
assert code == 0 and "file-shift settings" in helped and "--gain" in helped and "file-shift," in helped, helped

# ivlib.steer: named among the methods that steer, and among those that steer at every position
lm = ivlib.wrap(*ivlib.tiny_model("gpt2"), name="tiny-gpt2")
task = ivlib.load_task("review_sentiment")
prompt = ivlib.encode(lm, task, demos=[("a great film", "good")], query="a dull film")
for method, kwargs, needle in (
    ("icl", {"prompt": prompt}, "does not steer activations; accepted: file-shift, tv, fv, sv, icv, iv"),
    ("tv", {"every_position": True}, "accepted with every_position: file-shift, fv, icv, iv"),
):
    try:
        with ivlib.steer(ivlib.get_method(method)(), lm, **kwargs):
            pass
    except ivlib.UsageError as exc:
        assert needle in str(exc), str(exc)
    else:
        raise AssertionError(f"steer accepted {method}")

# the model registry accepts the key its setting reads, and checks it as the setting does
config, bad = tmp / "models.yaml", tmp / "bad.yaml"
config.write_text("models:\\n  shifted: {builtin: tiny-gpt2, shift_depth: 1.0}\\n")
bad.write_text("models:\\n  bad: {builtin: tiny-gpt2, shift_depth: 2}\\n")
common = ["-t", "review_sentiment", "-s", "1", "-e", "4", "-n", "16"]
base = ["-c", str(repo / "config/tiny.yaml"), "-c", str(config), *common]
results = tmp / "runs.jsonl"
refused = ["-c", str(repo / "config/tiny.yaml"), "-c", str(bad), *common, "-m", "bad", "--method", "file-shift"]
code, _, err = run(refused + ["--quiet", "--results", str(results)])
assert code == 2 and "models.bad.shift_depth 2 is not accepted; accepted: a finite number >= 0 and <= 1" in err, err
for method in (["--method", "icl"], ["--method", "file-shift", "--gain", "0", "3"]):
    code, _, err = run(base + ["-m", "shifted", *method, "--quiet", "--results", str(results)])
    assert code == 0, err
records = [json.loads(line) for line in results.read_text().splitlines()]
assert records[-1]["hyperparameters"]["depth"] == 1.0  # the entry's value, not the default 0.5

# select chooses a gain; its test commands run; the report puts the column at its declared position
code, chosen, _ = run(["select", "--results", str(results), "--commands", "-n", "16"])
assert code == 0 and "| file-shift |" in chosen, chosen
for line in chosen.splitlines():
    if line.startswith("python iv.py"):
        assert run(shlex.split(line)[2:] + ["--quiet"])[0] == 0, line
code, _, _ = run(["report", "--results", str(results), "--out", str(tmp / "report")])
header = next(line for line in (tmp / "report" / "table.md").read_text().splitlines() if line.startswith("| Task"))
assert header.startswith("| Task | icl | file-shift |"), header
print("checked")
"""


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_one_file_in_a_copy_of_the_package_is_a_method_everywhere(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO / "ivlib", source / "ivlib", ignore=shutil.ignore_patterns("__pycache__"))
    before = _digests(source)
    (source / "ivlib" / "methods" / "file_shift.py").write_text(METHOD.replace("NAME", "file-shift"))
    after = _digests(source)
    assert set(after) - set(before) == {"ivlib/methods/file_shift.py"}  # one file added...
    assert {k: v for k, v in after.items() if k in before} == before  # ...and no other file touched
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHECKS, str(source), str(tmp_path), str(REPO)],
        cwd=tmp_path,  # not the checkout: `python -c` puts the working directory first on sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("checked"), done.stderr[-3000:]


def _installed(site: Path, name: str, module: str, text: str) -> None:
    """A package as pip leaves it: its module and a dist-info folder naming the entry point."""
    (site / f"{module}.py").write_text(text)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINTS}]\n{name} = {module}\n")


@pytest.fixture()
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    names = set(METHODS)
    yield folder
    for name in set(METHODS) - names:
        del METHODS[name]
    for module in ("plugin_shift", "broken_plugin"):
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


def test_an_installed_package_registers_its_method_by_the_entry_point(site, capsys):
    _installed(site, "plugin-shift", "plugin_shift", METHOD.replace("NAME", "plugin-shift"))
    importlib.invalidate_caches()
    discover()
    assert list(METHODS)[:4] == ["zero-shot", "icl", "plugin-shift", "tv"]  # its declared position
    assert main(["methods"]) == 0 and "plugin-shift" in capsys.readouterr().out.split()
    assert main(["--help"]) == 0 and "plugin-shift settings" in capsys.readouterr().out


def test_a_plugin_that_fails_to_load_is_one_warning_and_the_others_stay(site):
    _installed(site, "broken", "broken_plugin", "raise ImportError('needs a package that is not installed')\n")
    importlib.invalidate_caches()
    with pytest.warns(PluginWarning, match="method plugin 'broken' .broken_plugin. failed to load .ImportError"):
        discover()
    assert "iv" in METHODS and "broken" not in METHODS
