"""Shared fixtures: tiny models built from configs and the built-in task (no download)."""

from __future__ import annotations

import pytest
import torch

from ivlib.builtin_tasks import vocabulary
from ivlib.layout import discover_layout
from ivlib.models import LoadedModel
from ivlib.prompts import PromptEncoder
from ivlib.tasks import load_task
from ivlib.tiny import build_tiny

TASK_SPEC = {"builtin": "review_sentiment", "label_words": ["bad", "good"]}


def wrap(arch: str) -> LoadedModel:
    model, tok = build_tiny(arch, vocabulary())
    return LoadedModel(
        f"tiny-{arch}", model, tok, discover_layout(model), torch.device("cpu"), torch.float32, "test", add_bos=True
    )


@pytest.fixture(scope="session")
def task():
    return load_task("review_sentiment", TASK_SPEC)


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def lm(request) -> LoadedModel:
    return wrap(request.param)


@pytest.fixture(scope="session")
def gpt2() -> LoadedModel:
    return wrap("gpt2")


@pytest.fixture()
def encoder(lm, task) -> PromptEncoder:
    return PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
