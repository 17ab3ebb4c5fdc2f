"""The release harnesses' own logic (bench/releases/), without any release checkout or download:
the adapters change no number, the queries are the CLI's, the answers become ivlib's intervals
and pair only with runs that answered the same queries."""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ivlib
from ivlib.episodes import Episode, Example
from ivlib.errors import UsageError
from ivlib.experiment import evaluation_episodes
from ivlib.metrics import bootstrap_accuracy, bootstrap_f1
from ivlib.paired import paired_bootstrap
from ivlib.prompts import EncodedPrompt

RELEASES = Path(__file__).resolve().parents[1] / "bench" / "releases"
sys.path.insert(0, str(RELEASES))
import harness  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"release_harness_{name}", RELEASES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dt = _load("dt")
i2cl = _load("i2cl")


@pytest.fixture(scope="module")
def tiny():
    return ivlib.tiny_model("llama")


@pytest.fixture(scope="module")
def task():
    def split(start: int, n: int) -> tuple[list[str], list[int]]:
        return [f"w{i} w{i % 7}" for i in range(start, start + n)], [i % 3 for i in range(start, start + n)]

    return ivlib.task_from_lists(["a", "b", "c"], split(0, 90), split(90, 30), split(120, 30), name="three")


# ---- adapters ------------------------------------------------------------------------------------
def test_legacy_cache_scores_equal_the_native_cache(tiny):
    """A release passes the cache back as (key, value) pairs, expanded to its batch: same logits."""
    model, _ = tiny
    prefix, rest = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10], [11, 12]])
    mask = torch.ones(2, 6, dtype=torch.long)
    native = model(input_ids=prefix, use_cache=True).past_key_values
    reference = model(input_ids=torch.cat([prefix.expand(2, -1), rest], 1), attention_mask=mask).logits[:, -2:]
    adapted = harness.legacy_cache(model)
    legacy = adapted(input_ids=prefix, use_cache=True).past_key_values
    assert isinstance(legacy, tuple) and len(legacy) == len(native.layers)
    for (k, v), layer in zip(legacy, native.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)
    expanded = [[k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)] for k, v in legacy]
    logits = adapted(input_ids=rest, attention_mask=mask, past_key_values=expanded).logits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(k, layer.keys) for (k, _), layer in zip(legacy, native.layers)), "the past is not mutated"


def test_hub_tokenizer_class_renames_only(tiny):
    _, tok = tiny
    before = tok("w1 w2")["input_ids"]
    loaded = type(tok)
    renamed = harness.hub_tokenizer_class(tok, "GPT2TokenizerFast")
    assert renamed is tok and type(tok).__name__ == "GPT2TokenizerFast" and isinstance(tok, loaded)
    assert tok("w1 w2")["input_ids"] == before
    assert harness.hub_tokenizer_class(tok, "") is tok and type(tok).__name__ == "GPT2TokenizerFast"
    tok.__class__ = loaded


def test_py310_random_takes_a_set_as_a_tuple_and_shares_the_generator():
    population = {5, 3, 11, 7, 2}
    random.seed(3)
    expected = random.sample(tuple(population), 3)
    random.seed(3)
    assert harness.Py310Random().sample(population, 3) == expected
    shim = harness.Py310Random()
    random.seed(4)
    from_list = shim.sample([1, 2, 3, 4], 2)
    random.seed(4)
    assert from_list == random.sample([1, 2, 3, 4], 2)
    shim.seed(9)
    first = shim.random()
    random.seed(9)
    assert random.random() == first


def test_patched_restores_after_an_error():
    class Target:
        value = 1

    with pytest.raises(RuntimeError), harness.patched(Target, "value", 2):
        assert Target.value == 2
        raise RuntimeError
    assert Target.value == 1


def test_release_modules_are_forgotten(tmp_path):
    (tmp_path / "release_only_module_xyz.py").write_text("VALUE = 7\n")
    before = list(sys.path)
    with harness.release_on_path(tmp_path):
        import release_only_module_xyz

        assert release_only_module_xyz.VALUE == 7
    assert "release_only_module_xyz" not in sys.modules and sys.path == before


# ---- arguments -----------------------------------------------------------------------------------------------
def test_checkout_is_refused_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="is not a folder"):
        harness.checkout(str(tmp_path / "missing"), "run_i2cl.py", "I2CL")
    with pytest.raises(UsageError, match="has no run_i2cl.py"):
        harness.checkout(str(tmp_path), "run_i2cl.py", "I2CL")
    (tmp_path / "run_i2cl.py").write_text("")
    assert harness.checkout(str(tmp_path), "run_i2cl.py", "I2CL") == tmp_path.resolve()
    with pytest.raises(UsageError, match="-n 0 is out of range"):
        harness.positive("-n", 0)


def test_guarded_exits_2_with_one_line(capsys):
    def main():
        raise UsageError("--release 'x' is not a folder; accepted: a checkout")

    with pytest.raises(SystemExit) as exit_info:
        harness.guarded(main, "dt.py")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "dt.py: --release 'x' is not a folder; accepted: a checkout\n"


def test_release_task_keys(task):
    assert dt.release_key(task, "mr") == "mr" and i2cl.release_key(task, "sst2") == "sst2"
    for module in (dt, i2cl):
        with pytest.raises(UsageError, match="--release-task 'three' is not one this harness maps"):
            module.release_key(task, None)


# ---- data ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixed", [False, True])
def test_query_rows_are_the_cli_queries(task, fixed):
    demos = evaluation_episodes(task, "train", 1, 1, 3, None)[0].demos if fixed else None
    episodes = evaluation_episodes(task, "test", 0 if fixed else 1, 30, 3, demos)
    assert harness.query_rows(task, "test", 30, 3) == [e.query.index for e in episodes]


def test_rows_as_records_use_the_release_fields(task):
    rows = harness.query_rows(task, "test", 4, 0)
    records = harness.rows_as_records(task, "test", rows, "sentence", "label")
    part = task.splits["test"]
    assert records == [{"sentence": part.texts[r], "label": int(part.labels[r])} for r in rows]


# ---- numbers ---------------------------------------------------------------------------------------------
def test_summary_is_ivlib_bootstrap():
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    got = harness.summary(gold, pred, 2, seed=42)
    record = bootstrap_f1(gold, pred, 2, seed=42)  # what an ivlib run with --seed 42 records for these answers
    assert got == {"n": 200, "accuracy": record["micro"], "macro": record["macro"]}
    assert got["accuracy"]["value"] == pytest.approx(np.mean(gold == pred))
    assert harness.pct({"value": 0.7127, "ci_low": 0.67, "ci_high": 0.754}) == "71.3 [67.0, 75.4]"
    with pytest.raises(ValueError, match="of one length"):
        harness.summary([0, 1], [0], 2, seed=0)


def test_pair_needs_the_same_queries():
    gold, ours, theirs = [0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 1, 1], [0, 0, 0, 0, 1, 0]
    release = harness.sample_lines([4, 2, 9, 1, 3, 5], gold, theirs)
    ivlib_lines = harness.sample_lines([4, 2, 9, 1, 3, 5], gold, ours)
    paired = harness.pair(release, ivlib_lines, 2)
    expected = paired_bootstrap(gold, ours, theirs, 2)["accuracy"]
    assert paired["accuracy"] == vars(expected) and paired["agreement"] == pytest.approx(4 / 6)
    assert (paired["wins"], paired["losses"]) == (1, 1)
    shifted = harness.sample_lines([4, 2, 9, 1, 3, 6], gold, ours)
    with pytest.raises(UsageError, match="did not answer the same queries"):
        harness.pair(release, shifted, 2)
    with pytest.raises(ValueError, match="differ in length"):
        harness.sample_lines([1, 2], [0], [0])


def test_compare_takes_only_runs_over_the_release_queries():
    """A results file holds ICL under DT's 200 queries and under I2CL's 500: compare takes the one
    with the release's task, --seed and query count."""
    release = {"task": "sst2-local", "seed": 42, "answers": {"icl": [{}] * 200}}
    run = {"task": "sst2-local", "seed": 42, "n_eval_episodes": 200}
    assert harness.same_queries(run, release, "icl")
    for key, other in (("n_eval_episodes", 500), ("seed", 43), ("task", "rotten_tomatoes-local")):
        assert not harness.same_queries({**run, key: other}, release, "icl")


def test_sv_pairs_item_by_item():
    """ivlib's draws (with replacement) from State Vector's items meet the release's answer to each item."""
    ranks = [0, 3, 0, 1]  # the release: items 0 and 2 right
    lines = [{"query_row": r, "correct": c} for r, c in ((2, True), (1, True), (2, False), (0, True))]
    theirs = harness.release_by_item(ranks, lines)
    assert [x["pred"] for x in theirs] == [0, 1, 0, 0] and [x["query_row"] for x in theirs] == [2, 1, 2, 0]
    ours = [harness.hit_line(x, x["correct"]) for x in lines]
    paired = harness.pair(theirs, ours, 2)
    assert paired["agreement"] == 0.5 and (paired["wins"], paired["losses"]) == (1, 1)
    with pytest.raises(UsageError, match="beyond the release's 4"):
        harness.release_by_item(ranks, [{"query_row": 4, "correct": True}])


def test_dt_reports_the_release_logged_step():
    # AdvantageLogger keeps a step when it is >= the best so far: ties go to the later step
    assert dt.best_step([(50.0, 1), (61.0, 3), (61.0, 7)]) == 7
    with pytest.raises(ValueError, match="logged no step"):
        dt.best_step([])


def test_dt_release_command_line_is_the_scripts():
    args = type("A", (), {"shot": 2, "model": "m", "kv_iter": 15, "batch_size": 32, "seed": 4})()
    argv = dt.release_args(args, "sst2")
    flags = dict(zip(argv[1::2], argv[2::2]))
    assert flags == {
        "--dataset": "sst2",
        "--prompt_version": "default",
        "--exemplar_method": "stratified",
        "--num_k_shots": "2",
        "--model_type": "gpt2",
        "--model_size": "m",
        "--kv_iter": "15",
        "--step_size": "0.01",
        "--momentum": "0.9",
        "--batch_size": "32",
        "--gpus": "0",
        "--in_8bit": "false",
        "--seed": "4",
    }


def test_i2cl_evaluations_in_the_release_order():
    assert i2cl.call_names(1) == ["zero-shot", "icl/run0", "i2cl/run0"]
    assert i2cl.call_names(2) == ["zero-shot", "icl/run0", "i2cl/run0", "icl/run1", "i2cl/run1"]
    assert i2cl.call_names(1, baseline=False) == ["i2cl/run0"]


def test_softmax_spy_records_the_argmax_and_passes_the_rest():
    spy = i2cl.SoftmaxSpy(torch.nn.functional)
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]])
    torch.testing.assert_close(spy.softmax(logits, dim=-1), torch.softmax(logits, dim=-1))
    assert spy.calls == [[1, 0, 1]]
    assert spy.relu is torch.nn.functional.relu


sv = _load("sv")


def test_sv_names_each_scoring_by_the_result_it_saved():
    saved = {"Regular": 0.5, "ICL baseline": 1.0}
    calls = [([0.5], [0, 3]), ([1.0], [0, 0])]
    assert sv.label_calls(saved, calls) == {"Regular": [0, 3], "ICL baseline": [0, 0]}
    with pytest.raises(ValueError, match="is not the recorded call's accuracy"):
        sv.label_calls({"Regular": 0.5, "ICL baseline": 0.5}, calls)
    with pytest.raises(ValueError, match="saved 1 results but scored 2 times"):
        sv.label_calls({"Regular": 0.5}, calls)


def test_sv_top1_is_rank_zero():
    """Rank 0 is a hit; the interval is the one an ivlib record seeded with the same --seed holds."""
    ranks = [0 if i % 3 == 0 or i % 7 == 0 else 1 + i % 5 for i in range(300)]
    hits = [int(r == 0) for r in ranks]
    got = sv.hits_summary(ranks, 233)
    assert got["n"] == 300 and got["accuracy"]["value"] == sum(hits) / 300
    assert got["accuracy"] == bootstrap_accuracy([1] * 300, hits, seed=233)
    assert got["accuracy"] != sv.hits_summary(ranks, 0)["accuracy"]  # the seed is the run's, not a constant


def test_sv_split_export_and_partition_check(tmp_path):
    data = {
        "demon": [{"input": "hot", "output": "cold"}],
        "valid": [{"input": "big", "output": "small"}],
        "test": [{"input": "up", "output": "down"}, {"input": "in", "output": "out"}],
    }
    fv = tmp_path / "antonym.json"
    fv.write_text(
        '[{"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}, {"input": "big", "output": "small"}]'
    )
    assert sv.partition_check(data, fv) == {"fv_file": str(fv), "items": 4, "found": 3, "fv_rows": 3}
    sv.export_split(tmp_path / "split", data, 1)
    assert (tmp_path / "split" / "test.jsonl").read_text() == '{"input": "up", "output": "down"}\n'
    assert (tmp_path / "split" / "train.jsonl").read_text() == '{"input": "hot", "output": "cold"}\n'
    argv = sv.release_args("antonym", "/d", "/s", 100, 233)
    assert dict(zip(argv[1::2], argv[2::2]))["--max_test_num"] == "100" and "--rand_seed" in argv


def test_sv_antonym_config_reads_the_exported_split(tmp_path):
    """bench/releases/sv-antonym.yaml (ivlib's side of the State Vector rows) reads the very items
    sv.py --export wrote, split for split, in order: ivlib sees the release's data."""
    data = {
        "demon": [{"input": f"d{i}", "output": f"D{i}"} for i in range(3)],
        "valid": [{"input": f"v{i}", "output": f"V{i}"} for i in range(4)],
        "test": [{"input": f"t{i}", "output": f"T{i}"} for i in range(5)],
    }
    sv.export_split(tmp_path / "results" / "releases" / "sv-antonym-split", data, 2)
    (tmp_path / "bench" / "releases").mkdir(parents=True)
    config = tmp_path / "bench" / "releases" / "sv-antonym.yaml"
    config.write_text((RELEASES / "sv-antonym.yaml").read_text())
    task = harness.load_ivlib_task("antonym-sv", [str(config)])
    for split, items in (("train", data["demon"]), ("validation", data["valid"]), ("test", data["test"][:2])):
        assert list(task.splits[split].texts) == [r["input"] for r in items]
        assert list(task.splits[split].answers) == [r["output"] for r in items]


class _StaiccSplit:
    """What the harness reads of a StaICC dataset split: inputs as one-field lists, label words."""

    def __init__(self, rows: list[tuple[str, str]], words: list[str]) -> None:
        self.rows, self.words = rows, words

    def __len__(self) -> int:
        return len(self.rows)

    def get_input_text(self, i: int) -> list[str]:
        return [self.rows[i][0]]

    def get_label(self, i: int) -> str:
        return self.rows[i][1]

    def find_index_from_label(self, word: str) -> int:
        return self.words.index(word)


class _StaiccExperimentor:
    """StaICC's experimentor as far as `check_prompts` reads it, writing SST-2's prompts as StaICC does
    (`sentence: {text} sentiment: {label}` lines, the inputs as stored: SST-2's end with a space)."""

    def __init__(self, demos: list[tuple[str, str]], queries: list[str], label_prefix: str = "sentiment: ") -> None:
        words = ["negative", "positive"]
        self.triplet_dataset = type("T", (), {})()
        self.triplet_dataset.demonstration = _StaiccSplit(demos, words)
        self.triplet_dataset.test = _StaiccSplit([(q, "negative") for q in queries], words)
        self.demonstration_sampler = [[(i + j) % len(demos) for j in range(4)] for i in range(len(queries))]
        self.prompt_former = self
        self.cut_by_length = 0
        self.label_prefix = label_prefix

    def write_prompt_from_dataline(self, lines: list[tuple[list[str], str]], query: list[str], cut: int = 0) -> str:
        body = "".join(f"sentence: {text[0]} {self.label_prefix}{word}\n" for text, word in lines)
        prompt = body + f"sentence: {query[0]} {self.label_prefix}"
        return prompt[: len(prompt) - cut]

    def _get_prompts_for_test_sample(self, i: int, repeat: int) -> str:
        lines = [
            (self.triplet_dataset.demonstration.get_input_text(d), self.triplet_dataset.demonstration.get_label(d))
            for d in self.demonstration_sampler[i + repeat * len(self.triplet_dataset.test)]
        ]
        return self.write_prompt_from_dataline(lines, self.triplet_dataset.test.get_input_text(i))


def _staicc_task():
    return type(
        "Task",
        (),
        {"name": "staicc-bench/sst2", "label_words": ["negative", "positive"], "prompt": {"template_task": "sst2"}},
    )()


def test_staicc_prompts_are_checked_text_for_text(tiny):
    staicc, lm = _load("staicc"), ivlib.wrap(*tiny)
    demos = [("a fine film", "positive"), ("dull", "negative"), ("moving", "positive"), ("flat", "negative")]
    assert staicc.check_prompts(_StaiccExperimentor(demos, ["so so", "great"]), lm, _staicc_task(), 2) == 2
    spaced = [(t + " ", w) for t, w in demos]  # SST-2's stored inputs end with a space: kept, as StaICC keeps it
    assert staicc.check_prompts(_StaiccExperimentor(spaced, ["so so ", "great"]), lm, _staicc_task(), 2) == 2
    other = _StaiccExperimentor(demos, ["so so"], label_prefix="label: ")  # not the staicc template
    with pytest.raises(SystemExit, match="query 0: prompts differ at character"):
        staicc.check_prompts(other, lm, _staicc_task(), 1)


def test_staicc_splits_are_checked_row_for_row():
    staicc = _load("staicc")
    words = ["negative", "positive"]
    parts = {
        "demonstration": [("a fine film ", "positive"), ("dull", "negative")],
        "calibration": [("moving", "positive"), ("   ", "negative"), ("flat", "negative")],  # an empty text
        "test": [("so so ", "negative")],
    }
    exp = type("E", (), {"triplet_dataset": type("T", (), {k: _StaiccSplit(v, words) for k, v in parts.items()})()})()

    def task_of(rows: dict[str, list[tuple[str, str]]]):
        splits = {
            role: ivlib.tasks.Split([t for t, _ in rows[name]], np.array([words.index(w) for _, w in rows[name]]))
            for name, role in staicc.ROLES.items()
        }
        return type("Task", (), {"label_words": words, "splits": splits})()

    kept = {k: [(t, w) for t, w in v if t.strip()] for k, v in parts.items()}  # ivlib drops empty texts
    assert staicc.check_splits(exp, task_of(kept)) == {"train": 2, "validation": 2, "test": 1}
    stripped = {**kept, "demonstration": [("a fine film", "positive"), ("dull", "negative")]}
    with pytest.raises(SystemExit, match="demonstration .ivlib's train. differs at row 0 of 2"):
        staicc.check_splits(exp, task_of(stripped))


# ---- Iterative Vectors (bench/releases/iv.py) ---------------------------------------------------------
iv = _load("iv")


def test_iv_release_command_line_is_the_script_test_step():
    """script.sh's test step (-s, -e, --strength, --ext-strength, --run-test), with this run's values."""
    args = argparse.Namespace(model="m", episodes=200, ext_shot=1, ext_batch=10, strength=0.5, ext_strength=0.3)
    args.shot, args.queries, args.seed, args.clean = 1, 500, 42, False
    argv = iv.release_args(args, "/tmp/x.yaml", "sst2")
    assert argv[0] == "iv.py" and argv[-1] == "--run-test"
    flags = dict(zip(argv[1:-1:2], argv[2:-1:2]))
    assert flags == {
        "-c": "/tmp/x.yaml", "-m": "m", "-t": "ivlib/sst2", "-g": "0", "-e": "200", "-s": "1", "--ext-batch": "10",
        "--strength": "0.5", "--ext-strength": "0.3", "--shot": "1", "-n": "500", "--seed": "42",
    }  # fmt: skip
    args.clean = True
    assert iv.release_args(args, "/tmp/x.yaml", "sst2")[-2:] == ["--run-test", "--run-clean"]


def test_iv_splits_reach_the_release_with_glue_fields(task):
    data = iv.as_dataset(task, "test")
    part = task.splits["test"]
    assert data.features["label"].names == ["a", "b", "c"]  # what the release's get_i2label reads
    assert list(data["sentence"]) == list(part.texts) and list(data["label"]) == part.labels.tolist()
    assert list(data["idx"]) == list(range(len(part.texts)))  # each row says where it is in ivlib's split


def test_iv_reads_the_release_result_line():
    line = "task=sst2 model=m shot=1 seed=42 micro=61.40 macro=58.02 weighted=60.11"
    assert iv.written_scores(line) == {"micro": 61.4, "macro": 58.02, "weighted": 60.11}


class _FakeFewshot:
    """The release's FewshotDataset as far as the recorder reads it: a dataset, and episodes of rows."""

    def __init__(self, dataset: object) -> None:
        self.dataset = dataset

    def random_episode(self, *drawn: object):  # (rng, shot, shuffle_support): the fake draws one episode
        return {"sentence": ["x", "y"], "label": [0, 1], "idx": [4, 7]}, {"sentence": ["z"], "label": [1], "idx": [9]}


def _fake_verbalize(*call: object):
    """Three tokens per sample (input, separator, answer), as the release's verbalize returns them."""
    samples = call[1]  # (verbalizer, samples, device)
    n = 3 * len(samples)
    io = torch.zeros(1, n, dtype=torch.bool)
    io[0, 1::3] = True
    return {"input_ids": torch.arange(n)[None]}, torch.zeros(1, n, dtype=torch.bool), io


@pytest.mark.parametrize("shift", [False, True])
def test_iv_recorders_keep_what_the_release_drew_and_tokenized(shift):
    util = type("Util", (), {"FewshotDataset": _FakeFewshot, "verbalize": staticmethod(_fake_verbalize)})
    train = object()
    record = iv.Recording()
    found = iv.recorders(util, record, {id(train): "train"}, shift)
    support, query = found["random_episode"](_FakeFewshot(train), None, 1)
    assert support["idx"] == [4, 7] and record.episodes == [("train", [4, 7], 9)]
    samples = [{"input": "x", "output": "a"}, {"input": "z", "output": "b"}]
    _, _, io = found["verbalize"](None, samples, "cpu")
    assert io[0].nonzero().flatten().tolist() == [1, 4]  # a few-shot prompt's mask is never moved
    _, _, io = found["verbalize"](None, samples[1:], "cpu")
    assert io[0].nonzero().flatten().tolist() == ([2] if shift else [1])  # the zero-shot one: one later
    assert record.prompts[0] == ([("x", "a"), ("z", "b")], list(range(6)), [1, 4])
    assert record.prompts[1][2] == [1], "the recording keeps the release's own positions"


def test_iv_episode_in_the_release_prompt_order(task):
    part, words = task.splits["test"], task.label_words
    a, b, q = 3, 8, 20
    pairs = [(part.texts[r], words[int(part.labels[r])]) for r in (b, a, q)]  # the release permuted them
    episode = iv.in_prompt_order(task, "test", [a, b], q, pairs)
    assert [d.index for d in episode.demos] == [b, a] and episode.query.index == q
    assert [d.label for d in episode.demos] == [int(part.labels[b]), int(part.labels[a])]
    with pytest.raises(SystemExit, match="not among its episode's rows"):
        iv.in_prompt_order(task, "test", [a, 5], q, pairs)
    with pytest.raises(SystemExit, match="query text is not row 21"):
        iv.in_prompt_order(task, "test", [a, b], 21, pairs)


@pytest.mark.parametrize("ex_sep", [[99], [98, 99]])
def test_iv_release_prompt_is_cut_at_the_query_separator(ex_sep):
    demo = Episode((Example("d", 1, index=0),), Example("q", 0, index=1))
    ids = [10, 11, 1, 20, *ex_sep, 12, 13, 1, 21]  # demo input, sep, answer, example separator, query, sep, answer
    query_sep = 4 + len(ex_sep) + 2
    prompt = iv.release_prompt(demo, ids, [2, query_sep], 3, ex_sep)
    assert prompt.ids == ids[: query_sep + 1] and prompt.sep_pos == [2, query_sep]
    assert prompt.sep_class == [1, 3] and prompt.label == 0 and prompt.query_start == 4 + len(ex_sep)
    alone = iv.release_prompt(demo.query_only(), [12, 13, 1, 21], [2], 3, ex_sep)
    assert alone.ids == [12, 13, 1] and alone.query_start == 0 and alone.sep_class == [3]
    with pytest.raises(SystemExit, match="2 separators for 1 examples"):
        iv.release_prompt(demo.query_only(), ids, [2, query_sep], 3, ex_sep)


def test_iv_episodes_and_prompts_follow_the_release_calls(task):
    """Extraction draws an episode and tokenizes its few-shot then its zero-shot prompt; evaluation one prompt."""
    part, words = task.splits["train"], task.label_words
    test = task.splits["test"]

    def sample(split, r):
        return (split.texts[r], words[int(split.labels[r])])

    record = iv.Recording(
        episodes=[("train", [1, 2, 3], 4), ("test", [5, 6, 7], 8)],
        prompts=[
            ([sample(part, r) for r in (3, 1, 2, 4)], [0, 1, 2, 9, 3, 4, 5, 9, 6, 7, 8, 9, 10, 11, 12], [1, 5, 9, 13]),
            ([sample(part, 4)], [10, 11, 12], [1]),
            ([sample(test, r) for r in (5, 6, 7, 8)], [0, 1, 2, 9, 3, 4, 5, 9, 6, 7, 8, 9, 10, 11, 12], [1, 5, 9, 13]),
        ],
    )
    fit, evaluated, tokens = iv.episodes_and_prompts(task, record, 1, [9])
    assert [d.index for d in fit[0].demos] == [3, 1, 2] and fit[0].query.index == 4
    assert [d.index for d in evaluated[0].demos] == [5, 6, 7] and evaluated[0].query.index == 8
    assert tokens[fit[0]].ids == [0, 1, 2, 9, 3, 4, 5, 9, 6, 7, 8, 9, 10, 11] and tokens[fit[0]].query_start == 12
    assert tokens[fit[0].query_only()].ids == [10, 11] and len(tokens) == 3


def test_iv_vector_difference():
    ours = torch.randn(4, 3, 8)
    same = iv.vector_difference(ours.clone(), ours)
    assert same["max_abs"] == 0 and same["relative"] == 0 and same["cosine_min"] == pytest.approx(1.0)
    moved = ours.clone()
    moved[2, 1, 5] += 0.5
    got = iv.vector_difference(moved, ours)
    assert got["max_abs"] == pytest.approx(0.5) and got["relative"] == pytest.approx(0.5 / float(ours.norm()))
    assert got["relative_worst_layer"] == pytest.approx(0.5 / float(ours[2].norm()))


def test_iv_ivlib_on_release_tokens_is_ivlib_when_the_ids_agree(task):
    """ivlib's IV on a token table equal to its own prompts gives its own vectors and answers; a table
    whose zero-shot prompts differ moves the vectors: the table, not the encoder, is what is scored."""
    lm = ivlib.wrap(*ivlib.tiny_model("llama"), add_bos=False)  # its own: another test adapts the shared one's forward
    fit = evaluation_episodes(task, "train", 1, 12, 0, None, "extract")
    evaluated = evaluation_episodes(task, "test", 1, 6, 0, None)
    encoder = ivlib.encoder(lm, task, template="iv")
    tokens = {e: encoder.encode(e) for e in fit + evaluated}
    tokens.update({e.query_only(): encoder.encode(e.query_only()) for e in fit})
    args = argparse.Namespace(shot=1, batch_size=4, strength=0.5, ext_strength=0.3, ext_batch=5, seed=0, clean=False)
    own = iv.ivlib_run(lm, task, args, (fit, evaluated), None)
    given = iv.ivlib_run(lm, task, args, (fit, evaluated), tokens)
    assert own["pred"] == given["pred"] and own["ids"] == given["ids"]
    torch.testing.assert_close(own["vectors"], given["vectors"], rtol=0, atol=0)
    for e in fit:
        p = tokens[e.query_only()]
        tokens[e.query_only()] = EncodedPrompt([p.ids[0], *p.ids], [s + 1 for s in p.sep_pos], p.sep_class, p.label, 0)
    moved = iv.ivlib_run(lm, task, args, (fit, evaluated), tokens)
    assert not torch.allclose(moved["vectors"], own["vectors"])
    icl = iv.ivlib_run(lm, task, argparse.Namespace(**{**vars(args), "clean": True}), (fit, evaluated), tokens)
    assert icl["vectors"] is None and len(icl["pred"]) == 6


def test_iv_refuses_a_bad_checkout_and_missing_baukit(tmp_path, capsys, monkeypatch):
    args = argparse.Namespace(threads=1, release=str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        harness.guarded(lambda: iv.run(args), "iv.py")
    assert exit_info.value.code == 2 and "has no iv.py" in capsys.readouterr().err
    monkeypatch.setattr(sys, "path", list(sys.path))  # --deps is appended to it
    if importlib.util.find_spec("baukit") is None and "baukit" not in sys.modules:
        with pytest.raises(UsageError, match="baukit is not importable"):
            iv.load_baukit(str(tmp_path))
