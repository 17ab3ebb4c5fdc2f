"""A method defined in this file alone, with no edit anywhere else, runs through everything a
registered method gets: CLI flags and checks, several evaluation values sharing one fit, --resume,
--save/--load-vectors (with its fitting settings adopted), `select` and its test command, `report`."""

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ivlib.cli import main
from ivlib.hooks import edit_outputs, stack_reads
from ivlib.methods import METHODS, Method, register
from ivlib.settings import EVAL, MethodSettings, setting_field

REPO = Path(__file__).resolve().parent.parent
NAME = "query-shift"


@dataclass(frozen=True)
class QueryShiftSettings(MethodSettings):
    gain: float = setting_field(1.0, "scale of the added vector", role=EVAL, symbol="g")
    depth: float = setting_field(0.5, "edited block, as a fraction of the depth", low=0.0, high=1.0)


class QueryShift(Method[QueryShiftSettings]):
    """Adds gain x (the mean block output at the query separator of training prompts) there, at one block."""

    name = NAME
    needs_fit = True
    has_state = True
    grid_axes = ("gain", "depth", "ext_shot")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vector = None  # [D]

    def _block(self, scorer):
        blocks = scorer.layout.blocks
        return blocks[round(self.settings.depth * (len(blocks) - 1))]

    def fit(self, scorer, encoder, episodes, _validation=None):
        def read(batch):  # [B, D] block output at each row's query separator
            rows = torch.arange(batch.input_ids.shape[0])
            with edit_outputs([self._block(scorer)], rows, batch.query_cols, read=True) as sites:
                scorer.forward(batch)
            return stack_reads(sites)[0]

        prompts = [encoder.encode(e) for e in episodes]
        self.vector = scorer.runner.map(prompts, read, "query-shift fit").mean(dim=0)

    def predict(self, scorer, batch):
        rows = torch.arange(batch.input_ids.shape[0])
        add = (self.settings.gain * self.vector).to(scorer.lm.dtype).expand(len(rows), -1)
        with edit_outputs([self._block(scorer)], rows, batch.query_cols, add=[add]):
            return scorer.label_scores(batch)

    def state(self):
        return {"vector": self.vector}

    def load_state(self, tensors):
        self.vector = tensors["vector"].float()


@pytest.fixture()
def registered():
    register(QueryShift)
    yield
    del METHODS[NAME]


BASE = [
    "-c",
    "config/tiny.yaml",
    "-m",
    "tiny-gpt2",
    "-t",
    "review_sentiment",
    "-s",
    "1",
    "-e",
    "6",
    "-n",
    "24",
    "--quiet",
]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.usefixtures("registered")
def test_a_method_declared_in_one_file_runs_through_cli_resume_state_select_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    results, vec = tmp_path / "runs.jsonl", tmp_path / "qs.safetensors"
    method = BASE + ["--method", NAME, "--results", str(results)]

    # flags and help come from the declaration
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert f"{NAME} settings" in help_text and "--gain" in help_text and "--depth" in help_text
    assert main(["methods"]) == 0 and NAME in capsys.readouterr().out.split()

    # several gains share one fit; gain 0 is no edit at all, so it must score exactly as ICL
    assert main(method + ["--gain", "0", "2", "--depth", "1.0", "--save-vectors", str(vec)]) == 0
    zero, two = _records(results)
    assert [r["hyperparameters"]["gain"] for r in (zero, two)] == [0.0, 2.0]
    assert zero["hyperparameters"]["depth"] == 1.0 and zero["hyperparameters"]["ext_shot"] == 1
    assert zero["fit"]["shared_by_gains"] == [0.0, 2.0] and zero["fit"]["depth"] == 1.0
    assert "gain" not in zero["fit"]  # an evaluation setting is not part of the fitted state
    # (another method's setting is ignored, so one flag set can serve a sweep over methods)
    assert main(BASE + ["--method", "icl", "--gain", "5", "--results", str(tmp_path / "icl.jsonl")]) == 0
    (icl,) = _records(tmp_path / "icl.jsonl")
    assert zero["metrics"] == icl["metrics"] and "gain" not in icl["hyperparameters"]
    assert two["metrics"] != zero["metrics"]  # the vector does something
    out = capsys.readouterr().out
    assert f"{NAME} g=0.0 |" in out and f"{NAME} g=2.0 |" in out

    # --resume: nothing new for settings already recorded, only the missing gain otherwise
    assert main(method + ["--gain", "0", "2", "--depth", "1.0", "--resume"]) == 0
    assert "skipped (--resume)" in capsys.readouterr().out and len(_records(results)) == 2
    assert main(method + ["--gain", "2", "3", "--depth", "1.0", "--resume"]) == 0
    assert [r["hyperparameters"]["gain"] for r in _records(results)[2:]] == [3.0]

    # a loaded state brings its fitting settings (depth 1.0, not the default 0.5) into the record
    assert main(method + ["--gain", "2", "--load-vectors", str(vec), "--results", str(tmp_path / "loaded.jsonl")]) == 0
    (loaded,) = _records(tmp_path / "loaded.jsonl")
    assert loaded["hyperparameters"] == two["hyperparameters"] and loaded["metrics"] == two["metrics"]

    # checks come from the declaration too; nothing is written on a refusal
    before = results.read_bytes()
    for argv, needle in (
        (method + ["--depth", "2"], "--depth 2 is out of range; accepted: a finite number >= 0 and <= 1"),
        (method + ["--gain", "x"], "--gain 'x' is not accepted"),
        (method + ["--depth", "0.0", "--load-vectors", str(vec)], "was fitted with --depth 1.0"),
    ):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert results.read_bytes() == before
    _check_select_and_report(results, tmp_path, capsys)


def _check_select_and_report(results, tmp_path, capsys):
    """select picks the best validation setting and prints a test command for the chosen gain alone;
    the report has the method's column and a heatmap over its declared axes."""
    assert main(["select", "--results", str(results), "--commands", "-n", "24"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (chosen,) = [line for line in lines if f"| {NAME} |" in line]
    (command,) = [line for line in lines if line.startswith("python iv.py") and NAME in line]
    args = shlex.split(command)[2:]
    best_gain = json.loads(chosen.rsplit(" | ", 1)[1])["gain"]
    assert args.count("--gain") == 1 and args[args.index("--gain") + 1] == str(best_gain)
    assert main(args + ["--quiet"]) == 0
    test_record = _records(results)[-1]
    assert test_record["split"] == "test" and test_record["hyperparameters"]["gain"] == best_gain
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "table.md").read_text()
    assert NAME in table.splitlines()[next(i for i, line in enumerate(table.splitlines()) if line.startswith("| Task"))]
    heatmap = tmp_path / "report" / f"heatmap_tiny-gpt2_review_sentiment_{NAME}.png"
    assert heatmap.stat().st_size > 5000
