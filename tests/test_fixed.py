"""--demos fixed: one demonstration set per seed, its prefix encoded once, scores equal to whole prompts."""

import json

import pytest
import torch
from conftest import wrap

from ivlib.cli import main
from ivlib.episodes import fixed_demos, sample_episodes, with_demos
from ivlib.errors import UsageError
from ivlib.experiment import Experiment, RunSpec, demo_set, fixed_scores
from ivlib.methods.base import Method, register
from ivlib.methods.dt import DeepThinking
from ivlib.methods.fv import FunctionVectors
from ivlib.methods.icl import ICL
from ivlib.methods.iv import IterativeVectors
from ivlib.methods.tv import TaskVectors
from ivlib.prompts import PromptEncoder, split_prefix
from ivlib.scoring import Scorer
from ivlib.tiny import TINY_ARCHS

_models = {}


def tiny(arch):
    if arch not in _models:
        _models[arch] = wrap(arch)
    return _models[arch]


def _fitted(name, lm, n_classes):
    """Each method with a random but fixed state, so the edits are large enough to matter."""
    g = torch.Generator().manual_seed(3)
    layout = lm.layout
    if name == "icl":
        return ICL()
    if name == "iv":
        iv = IterativeVectors(strength=1.0)
        iv.vectors = torch.randn(layout.n_layers, n_classes + 1, layout.d_model, generator=g)
        return iv
    if name == "tv":
        tv = TaskVectors()
        tv.theta, tv.layer = torch.randn(layout.n_layers, layout.d_model, generator=g), 1
        return tv
    if name == "fv":
        fv = FunctionVectors()
        fv.vector, fv.layer = torch.randn(layout.d_model, generator=g), 0
        return fv
    dt = DeepThinking(dt_eta=1.0, dt_step=3)
    dt.step = 3
    return dt


def _prompts(lm, task, shot=2, n=6, seed=1):
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    demos = demo_set(task, shot, seed)
    episodes = with_demos(sample_episodes(task.splits["validation"], 2, 0, n, seed, "validation/eval"), demos)
    return encoder, [encoder.encode(e) for e in episodes]


@pytest.mark.parametrize("name", ["icl", "iv", "dt", "tv", "fv"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_cached_prefix_scores_equal_whole_prompts(arch, name, task):
    lm = tiny(arch)
    encoder, prompts = _prompts(lm, task)
    method = _fitted(name, lm, encoder.n_classes)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)  # 6 queries: batches of 4 and 2, padded
    try:
        whole = scorer.runner.map(prompts, lambda b: method.predict(scorer, b), "whole")
    except UsageError as exc:  # DT refuses a sliding-window cache (mistral): the cached path refuses alike
        with pytest.raises(UsageError, match="cannot be tuned"):
            fixed_scores(method, scorer, prompts, "cached")
        assert "cannot be tuned" in str(exc)
        return
    calls = []
    encode = scorer.encode_prefix
    scorer.encode_prefix = lambda batch: calls.append(batch.input_ids.shape) or encode(batch)
    cached = fixed_scores(method, scorer, prompts, "cached")
    if name != "dt":  # DT tunes its own cache; the others encode the prefix once, for all six queries
        assert calls == [torch.Size([1, prompts[0].query_start])]
    torch.testing.assert_close(cached, whole, atol=2e-4, rtol=1e-4)
    other = _fitted("icl", lm, encoder.n_classes)
    if name != "icl":  # the method's edits are in the cached scores: they differ from plain ICL's
        assert (fixed_scores(other, scorer, prompts, "icl") - cached).abs().max() > 1e-3
