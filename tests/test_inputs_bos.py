"""How a prompt's text becomes tokens beyond its template: `--inputs verbatim` keeps a dataset's stored
whitespace (StaICC's SST-2 inputs end with a space; ivlib strips by default), `--bos tokenizer` begins
a prompt as the tokenizer's own call does (a release's tokenizer(prompt)) instead of with the model's
BOS. Both are what `--preset staicc` needs to write StaICC's own prompts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tokenizers.processors import TemplateProcessing

import ivlib
from ivlib.builtin_tasks import vocabulary
from ivlib.episodes import Episode, Example
from ivlib.errors import UsageError
from ivlib.experiment import make_scorer, task_encoder
from ivlib.methods.tv_hendel import zero_shot
from ivlib.presets import get as preset
from ivlib.prompts import PromptEncoder, collate
from ivlib.protocol import Protocol, marks
from ivlib.tasks import load_task
from ivlib.templates import IV
from ivlib.tiny import build_tiny

REPO = Path(__file__).resolve().parent.parent
PHRASES = ["the food was great", "the movie was awful", "the soup was bland", "the show was superb"]


def _spaced_rows(n: int) -> pd.DataFrame:
    """Texts stored as StaICC stores SST-2's: a space at the end (and one before, for the leading strip)."""
    return pd.DataFrame({"text": [f" {PHRASES[i % 4]} {i} " for i in range(n)], "label": [i % 2 for i in range(n)]})


@pytest.fixture()
def spaced(tmp_path: Path) -> dict:
    path = tmp_path / "spaced.parquet"
    _spaced_rows(120).to_parquet(path)
    return {"data_files": {"train": str(path)}, "label_names": ["neg", "pos"], "label_words": ["bad", "good"]}


def test_verbatim_keeps_the_stored_whitespace_and_says_so(spaced):
    stripped, verbatim = load_task("spaced", spaced), load_task("spaced", spaced, "verbatim")
    assert stripped.inputs == "stripped" and "inputs" not in stripped.provenance  # earlier records unchanged
    assert verbatim.inputs == "verbatim" and verbatim.provenance["inputs"] == "verbatim"
    for role, split in verbatim.splits.items():
        assert all(t.startswith(" ") and t.endswith(" ") for t in split.texts)
        assert [t.strip() for t in split.texts] == stripped.splits[role].texts  # the same rows, same order
    with pytest.raises(UsageError, match="inputs 'raw' is not accepted; accepted: stripped, verbatim"):
        load_task("spaced", spaced, "raw")


def _encoder(add_bos: bool | str, strip: bool = True, tokenizer=None) -> PromptEncoder:
    tok = tokenizer if tokenizer is not None else build_tiny("llama", vocabulary())[1]
    return PromptEncoder(tok, ["bad", "good"], add_bos, strip=strip)


def test_a_verbatim_input_reaches_the_prompt_with_its_trailing_space():
    episode = Episode([Example("the soup was bland ", 0, index=0)], Example("the food was great ", 1, index=1))
    kept, stripped = _encoder(True, strip=False), _encoder(True)
    assert kept.query_context(episode.query) == "the food was great \n"
    assert stripped.query_context(episode.query) == "the food was great\n"
    assert kept.encode(episode).ids != stripped.encode(episode).ids
    assert kept.encode(episode).ids[:1] == stripped.encode(episode).ids[:1] == [kept.tok.bos_token_id]


def test_bos_tokenizer_begins_a_prompt_as_the_tokenizers_own_call_does():
    assert _encoder(True).bos == [2] and _encoder(False).bos == []
    assert _encoder("tokenizer").bos == []  # this tokenizer's call adds nothing (as SmolLM2's)
    tok = build_tiny("llama", vocabulary())[1]
    tok._tokenizer.post_processor = TemplateProcessing(  # ...and one that adds its BOS (as Gemma's)
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)]
    )
    assert tok("the food")["input_ids"][0] == tok.bos_token_id
    assert _encoder("tokenizer", tokenizer=tok).bos == [tok.bos_token_id]


def test_recorded_and_kept_apart_only_when_not_the_default():
    default, staicc_like = Protocol.build(), Protocol.build(inputs="verbatim", bos="tokenizer")
    assert "inputs" not in default.posing("classification") and "bos" not in default.posing("classification")
    assert staicc_like.posing("classification") == {"inputs": "verbatim", "bos": "tokenizer"}
    assert marks({"shot": 1, "inputs": "verbatim", "bos": "tokenizer"}) == ["verbatim", "tokenizer"]
    assert marks({"shot": 1, "inputs": "stripped", "bos": "model"}) == []
    with pytest.raises(UsageError, match="'first'"):
        Protocol.build(bos="first")


def test_the_staicc_preset_writes_prompts_as_staicc_does():
    values = preset("staicc").values
    assert (values["inputs"], values["bos"]) == ("verbatim", "tokenizer")


def test_a_protocol_asking_other_inputs_than_the_task_holds_is_refused(spaced, tmp_path):
    config = tmp_path / "spaced.yaml"
    config.write_text(json.dumps({"tasks": {"spaced": spaced}}))
    lm = ivlib.wrap(*ivlib.tiny_model("llama"))
    task = ivlib.load_task("spaced", str(config))
    assert ivlib.protocol_for(ivlib.load_task("spaced", str(config), inputs="verbatim")).inputs == "verbatim"
    with pytest.raises(UsageError, match="loaded with stripped inputs and the protocol asks for inputs 'verbatim'"):
        ivlib.fit("icl", lm, task, protocol=ivlib.protocol_for(task, inputs="verbatim"))


def _run(tmp_path: Path, config: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    results = tmp_path / "runs.jsonl"
    argv = [sys.executable, "iv.py", "-c", "config/tiny.yaml", "-c", str(config), "-m", "tiny-llama", "-t", "spaced"]
    done = subprocess.run(
        [
            *argv,
            "--method",
            "icl",
            "-n",
            "12",
            "--results",
            str(results),
            "--quiet",
            "--resume",
            "--log-samples",
            *flags,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    return done, records


def test_a_run_records_its_inputs_and_bos_and_resume_tells_them_apart(spaced, tmp_path):
    config = tmp_path / "spaced.yaml"
    config.write_text(json.dumps({"tasks": {"spaced": spaced}}))
    done, records = _run(tmp_path, config)
    assert done.returncode == 0, done.stderr
    assert records[0]["add_bos"] is True and "inputs" not in records[0]["task_provenance"]
    done, records = _run(tmp_path, config, "--inputs", "verbatim", "--bos", "tokenizer")
    assert done.returncode == 0 and len(records) == 2, done.stderr  # another protocol: run, not skipped
    record = records[1]
    assert (record["hyperparameters"]["inputs"], record["hyperparameters"]["bos"]) == ("verbatim", "tokenizer")
    assert record["task_provenance"]["inputs"] == "verbatim" and record["add_bos"] is False
    logs = [
        [json.loads(x)["scores"] for x in (tmp_path / r["samples"]["path"]).read_text().splitlines()] for r in records
    ]
    assert logs[0] != logs[1]  # the same episodes (seed), other tokens: other scores
    done, records = _run(tmp_path, config, "--inputs", "verbatim", "--bos", "tokenizer")
    assert done.returncode == 0 and len(records) == 2  # recorded: skipped
    bad, _ = _run(tmp_path, config, "--inputs", "raw")
    assert bad.returncode == 2 and "'raw'" in bad.stderr and "stripped, verbatim" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_state_fitted_on_other_prompts_is_not_loaded(spaced, tmp_path):
    config = tmp_path / "spaced.yaml"
    config.write_text(json.dumps({"tasks": {"spaced": spaced}}))
    vectors = tmp_path / "iv.safetensors"
    fit = ["--method", "iv", "-e", "4", "-s", "1", "--save-vectors", str(vectors)]
    done, _ = _run(tmp_path, config, *fit, "--inputs", "verbatim")
    assert done.returncode == 0, done.stderr
    refused, records = _run(tmp_path, config, "--method", "iv", "--load-vectors", str(vectors))
    assert refused.returncode == 2 and len(records) == 1, refused.stderr
    assert "was fitted with --inputs verbatim; this command gives stripped" in refused.stderr
    loaded, records = _run(tmp_path, config, "--method", "iv", "--load-vectors", str(vectors), "--inputs", "verbatim")
    assert loaded.returncode == 0 and len(records) == 1  # the same run: recorded, skipped (--resume)


@pytest.mark.parametrize("bos", ["model", "tokenizer"])
def test_tv_hendels_queries_alone_begin_as_the_runs_prompts_do(spaced, bos):
    """tv-hendel builds each query's prompt alone from the few-shot batch: it must begin with the run's
    own first ids (none under --bos tokenizer with this tokenizer), not with the model entry's BOS."""
    lm = ivlib.wrap(*ivlib.tiny_model("llama"))
    task = load_task("spaced", spaced)
    encoder = task_encoder(lm, task, 64, IV, bos)
    scorer = make_scorer(lm, task, encoder, 4, True)
    assert scorer.bos == encoder.bos == ([lm.tokenizer.bos_token_id] if bos == "model" else [])
    episodes = [Episode([Example(PHRASES[i], i % 2)], Example(PHRASES[i + 1], (i + 1) % 2)) for i in range(3)]
    prompts = [encoder.encode(e) for e in episodes]
    alone = zero_shot(collate(prompts, lm.tokenizer.pad_token_id), scorer.bos)
    for row, prompt in enumerate(prompts):
        real = alone.input_ids[row][alone.attention_mask[row].bool()].tolist()
        assert real == encoder.bos + prompt.ids[prompt.query_start :]  # the query's tokens after the run's BOS
        assert alone.query_starts[row] == len(encoder.bos)


def test_answer_options_end_where_their_text_ends_under_either_inputs():
    """--inputs verbatim keeps an input's stored spaces; an option is an answer, cut at its end as before."""
    query = Example("the food was great ", 0, options=("good  ", "bad "), index=0)
    kept, stripped = _encoder(True, strip=False), _encoder(True)
    assert kept.encode(Episode((), query)).options == stripped.encode(Episode((), query)).options
    assert (
        stripped.encode(Episode((), query)).options
        == stripped.encode(Episode((), Example("x", 0, ("good", "bad")))).options
    )


def test_a_task_from_lists_is_stripped_as_a_registry_task_or_kept_verbatim():
    train = ([f" {p} " for p in PHRASES] * 5, [0, 1, 0, 1] * 5)
    stripped = ivlib.task_from_lists(["bad", "good"], train)
    verbatim = ivlib.task_from_lists(["bad", "good"], train, inputs="verbatim")
    assert all(t == t.strip() for t in stripped.splits["train"].texts) and "inputs" not in stripped.provenance
    assert (
        all(t.startswith(" ") for t in verbatim.splits["train"].texts) and verbatim.provenance["inputs"] == "verbatim"
    )
    assert ivlib.protocol_for(verbatim).inputs == "verbatim"
    with pytest.raises(UsageError, match="'raw'"):
        ivlib.task_from_lists(["bad", "good"], train, inputs="raw")
