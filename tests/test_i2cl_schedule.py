"""Issue 29 item 6: I2CL's warm-up is the release's `int(0.05 * epochs * (n // batch))` steps (ivlib had
`int(0.05 * epochs)` whole epochs: no warm-up below 20 epochs, and a different one unless the epochs
were a multiple of 20). The learning rate of every optimiser step of a real calibration is compared with
the release's schedule written out here: linear warm-up, then a cosine over all the steps."""

from __future__ import annotations

import math

import pytest

from ivlib.episodes import sample_episodes
from ivlib.methods import i2cl
from ivlib.methods.i2cl import ImplicitICL, demonstrations, schedule
from ivlib.prompts import PromptEncoder
from ivlib.scoring import Scorer


def release_lr(step: int, warmup: int, total: int) -> float:
    """The release's LambdaLR factor at `step` (steps counted from 0, as the scheduler does)."""
    if step > warmup:
        return min(1.0, step / warmup) * (1 + math.cos(math.pi * step / total)) / 2
    return step / warmup


@pytest.mark.parametrize("epochs", [1, 19, 30, 50, 100])
@pytest.mark.parametrize("n, batch", [(4, 2), (10, 2), (8, 4), (6, 3)])
def test_where_the_batch_divides_the_prompts_the_steps_are_the_release_s(n, batch, epochs):
    per_epoch, warmup, total = schedule(n, batch, epochs)
    assert warmup == int(0.05 * epochs * (n // batch))
    assert total == epochs * n // batch == epochs * per_epoch  # the release's horizon and its steps taken


def test_warm_up_differs_from_whole_epochs_where_the_epochs_are_not_a_multiple_of_20():
    assert schedule(4, 2, 30)[1] == 3  # int(1.5 * 2); whole epochs gave int(1.5) * 2 = 2
    assert schedule(10, 2, 10)[1] == 2  # int(0.5 * 5); whole epochs gave 0: no warm-up at all
    assert schedule(3, 2, 100) == (2, 5, 200)  # the release's 5 warm-up steps; a full pass per epoch is 2 steps
    assert schedule(1, 2, 100) == (1, 0, 100)  # fewer prompts than a batch: no warm-up (the release divides by 0)


def test_a_calibration_steps_at_the_release_s_learning_rates(gpt2, task, monkeypatch):
    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    train = sample_episodes(task.splits["train"], 2, 2, 1, 5, "train/extract")
    demos = demonstrations(train)
    assert len(demos) == 4
    seen: list[float] = []
    step = ImplicitICL._step

    def record(self, scorer, prompts, optimiser, scheduler):
        seen.append(optimiser.param_groups[0]["lr"])
        return step(self, scorer, prompts, optimiser, scheduler)

    monkeypatch.setattr(i2cl.ImplicitICL, "_step", record)
    method = ImplicitICL(i2cl_epochs=30, i2cl_lr=0.01, i2cl_noise=0.0, seed=1)
    method.fit(Scorer(gpt2, encoder.label_ids, 4, quiet=True), encoder, train)
    warmup, total = int(0.05 * 30 * (4 // 2)), 30 * 4 // 2
    assert len(seen) == total == 60
    assert seen == pytest.approx([0.01 * release_lr(s, warmup, total) for s in range(total)], abs=1e-12)
    assert seen[3] == pytest.approx(0.01) and seen[2] == pytest.approx(0.01 * 2 / 3)  # 3 warm-up steps
