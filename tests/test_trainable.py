"""Fits that need gradients: `Scorer.trainable()` differentiates the frozen model for a few learned
parameters, and `differentiable_scores` is the evaluation's own scoring."""

import pytest
import torch

from ivlib.episodes import sample_episodes
from ivlib.scoring import Scorer


def _batch(lm, encoder, task, n=3):
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    episodes = sample_episodes(task.splits["validation"], 2, 1, n, 5, "validation/select")
    return scorer, scorer.batch([encoder.encode(e) for e in episodes])


def test_gradients_reach_a_hooked_parameter_and_never_the_weights(lm, encoder, task):
    scorer, batch = _batch(lm, encoder, task)
    block = lm.layout.blocks[0]
    gain = torch.zeros((), requires_grad=True)
    direction = torch.randn(lm.layout.d_model, generator=torch.Generator().manual_seed(0))

    def shift(_module, _args, output):  # block output += gain * direction, at every position
        hidden = output[0] if isinstance(output, tuple) else output
        edited = hidden + gain * direction
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    weights = list(lm.model.parameters())
    before = [p.requires_grad for p in weights]
    handle = block.register_forward_hook(shift)
    try:
        with scorer.trainable():
            scores = scorer.differentiable_scores(batch)  # [B, C]
            scores[:, 0].sum().backward()
    finally:
        handle.remove()
    assert gain.grad is not None and gain.grad.abs().item() > 0
    assert all(p.grad is None for p in weights)
    assert [p.requires_grad for p in weights] == before  # flags restored on exit
    # with gain 0 the differentiated forward is the evaluation's forward
    torch.testing.assert_close(scores.detach(), scorer.label_scores(batch), atol=1e-5, rtol=1e-5)


def test_differentiable_scores_refuse_outside_trainable(lm, encoder, task):
    scorer, batch = _batch(lm, encoder, task)
    with pytest.raises(RuntimeError, match="trainable"):
        scorer.differentiable_scores(batch)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="trainable"):
        scorer.differentiable_scores(batch)


def test_weights_flags_restored_when_the_fit_raises(lm, encoder, task):
    scorer, _ = _batch(lm, encoder, task)
    before = [p.requires_grad for p in lm.model.parameters()]
    with pytest.raises(ValueError), scorer.trainable():
        raise ValueError("a fit that fails half-way")
    assert [p.requires_grad for p in lm.model.parameters()] == before
