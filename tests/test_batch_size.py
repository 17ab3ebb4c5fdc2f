"""--batch-size auto: halve on out-of-memory and carry on, with the same results as a fixed size."""

import json

import pytest
import torch

from ivlib.cli import main
from ivlib.episodes import sample_episodes
from ivlib.errors import UsageError
from ivlib.scoring import Scorer


def _prompts(encoder, task, n=23):
    return [encoder.encode(e) for e in sample_episodes(task.splits["validation"], 2, 1, n, 4, "validation/eval")]


def test_out_of_memory_halves_the_batch_and_gives_the_same_scores(lm, encoder, task):
    prompts = _prompts(encoder, task)
    reference = Scorer(lm, encoder.label_ids, 4, quiet=True).runner.map(
        prompts, lambda b: Scorer(lm, encoder.label_ids, 4).label_scores(b), "ref"
    )
    scorer = Scorer(lm, encoder.label_ids, 32, quiet=True, shrink_on_oom=True)
    sizes = []

    def fits_only_five(batch):  # a device that holds at most 5 episodes
        sizes.append(batch.input_ids.shape[0])
        if batch.input_ids.shape[0] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return scorer.label_scores(batch)

    scores = scorer.runner.map(prompts, fits_only_five, "auto")
    assert scorer.runner.batch_size == 4  # 32 -> 16 -> 8 -> 4
    assert sizes[:4] == [23, 16, 8, 4] and max(sizes[4:]) <= 4
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)


def test_fixed_batch_size_out_of_memory_is_a_clear_error(lm, encoder, task):
    scorer = Scorer(lm, encoder.label_ids, 8, quiet=True)

    def never_fits(_batch):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(UsageError, match="out of memory at batch size 8.*--batch-size auto"):
        scorer.runner.map(_prompts(encoder, task, 5), never_fits, "eval")


def test_cli_auto_on_cpu_uses_the_cpu_default_and_records_it(tmp_path):
    out = tmp_path / "runs.jsonl"
    assert (
        main(
            [
                "-c",
                "config/tiny.yaml",
                "-m",
                "tiny-gpt2",
                "-t",
                "review_sentiment",
                "--method",
                "icl",
                "-n",
                "6",
                "--batch-size",
                "auto",
                "--quiet",
                "--results",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert record["batch_size_requested"] == "auto" and record["batch_size"] == 16


def test_cli_rejects_a_batch_size_word(capsys):
    code = main(["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "--batch-size", "big"])
    err = capsys.readouterr().err
    assert code == 2 and "'big'" in err and "'auto'" in err


def test_iv_extraction_halves_on_out_of_memory_and_fits_the_same_vectors(lm, encoder, task, monkeypatch):
    """The steered few-shot pass runs its own windows, not runner.map: it must shrink there too."""
    from ivlib.methods.iv import IterativeVectors

    train = sample_episodes(task.splits["train"], 2, 1, 9, 3, "train/extract")
    reference = IterativeVectors(0.5, 0.3, 4)
    reference.fit(Scorer(lm, encoder.label_ids, 2, quiet=True), encoder, train)

    real = Scorer.forward
    short = max(len(encoder.encode(e.query_only()).ids) for e in train)
    few_shot_rows = []

    def fits_two_long(self, batch):  # any number of zero-shot prompts fit, but only 2 few-shot ones
        if batch.input_ids.shape[1] > short:
            few_shot_rows.append(batch.input_ids.shape[0])
            if batch.input_ids.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch)

    monkeypatch.setattr(Scorer, "forward", fits_two_long)
    iv = IterativeVectors(0.5, 0.3, 4)
    scorer = Scorer(lm, encoder.label_ids, 8, quiet=True, shrink_on_oom=True)
    iv.fit(scorer, encoder, train)
    # window [0]: 1 row; window [1..4]: 4 rows fail at batch 8, again at 4, then run 2 by 2
    assert scorer.runner.batch_size == 2 and few_shot_rows[:3] == [1, 4, 4] and max(few_shot_rows[3:]) == 2
    torch.testing.assert_close(iv.vectors, reference.vectors, atol=1e-5, rtol=1e-5)

    with pytest.raises(UsageError, match="IV extract: few-shot: out of memory at batch size 4"):
        IterativeVectors(0.5, 0.3, 0).fit(Scorer(lm, encoder.label_ids, 4, quiet=True), encoder, train)
