"""The Python API refuses a wrong argument with a UsageError naming it, for every public function
(a table over the functions and their parameters), and a property test: whatever value any one
argument gets, the call either works or is refused in one line, never a raw exception."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ivlib
from ivlib.errors import UsageError


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    model, tok = ivlib.tiny_model("gpt2")
    lm = ivlib.wrap(model, tok, name="tiny")
    task = ivlib.load_task("review_sentiment")
    iv = ivlib.fit("iv", lm, task, ext_shot=1, episodes=2)
    prompt = ivlib.encode(lm, task, [("a fine film", "good")], "a dull film")
    return {
        "model": model,
        "tok": tok,
        "lm": lm,
        "task": task,
        "iv": iv,
        "prompt": prompt,
        "dir": tmp_path_factory.mktemp("api"),
    }


def _calls(e):
    """function name -> (a call that works, given keyword overrides)."""
    lm, task, iv = e["lm"], e["task"], e["iv"]
    train = ([f"film number {i}" for i in range(20)], ["good", "bad"] * 10)
    return {
        "tiny_model": lambda **k: ivlib.tiny_model(**{"arch": "gpt2", **k}),
        "wrap": lambda **k: ivlib.wrap(**{"model": e["model"], "tokenizer": e["tok"], **k}),
        "load_task": lambda **k: ivlib.load_task(**{"name": "review_sentiment", **k}),
        "task_from_lists": lambda **k: ivlib.task_from_lists(**{"label_words": ["bad", "good"], "train": train, **k}),
        "sample_episodes": lambda **k: ivlib.sample_episodes(**{"task": task, "n": 3, **k}),
        "encoder": lambda **k: ivlib.encoder(**{"lm": lm, "task": task, **k}),
        "encode": lambda **k: ivlib.encode(**{"lm": lm, "task": task, "query": "a film", **k}),
        "batch": lambda **k: ivlib.batch(**{"lm": lm, "prompts": e["prompt"], **k}),
        "protocol_for": lambda **k: ivlib.protocol_for(**{"task": task, **k}),
        "fit": lambda **k: ivlib.fit(**{"method": "icl", "lm": lm, "task": task, **k}),
        "evaluate": lambda **k: ivlib.evaluate(**{"method": "icl", "lm": lm, "task": task, "n": 4, **k}),
        "save": lambda **k: ivlib.save(
            **{"method": iv, "path": str(e["dir"] / "iv.safetensors"), "lm": lm, "task": task, **k}
        ),
        "load": lambda **k: ivlib.load(**{"path": str(e["dir"] / "iv.safetensors"), "lm": lm, "task": task, **k}),
        "steer": lambda **k: ivlib.steer(**{"method": iv, "lm": lm, "prompt": e["prompt"], **k}).__enter__(),
    }


BAD = [
    ("tiny_model", "arch", "gpt5"),
    ("tiny_model", "seed", -1),
    ("wrap", "model", "gpt2"),
    ("wrap", "tokenizer", None),
    ("wrap", "name", ""),
    ("wrap", "add_bos", "yes"),
    ("wrap", "add_bos", 1),
    ("wrap", "layout", ["blocks"]),
    ("load_task", "name", 3),
    ("load_task", "name", "no_such_task"),
    ("load_task", "config", 5),
    ("task_from_lists", "label_words", "ab"),
    ("task_from_lists", "label_words", [1, 2]),
    ("task_from_lists", "train", ("a text", "good")),
    ("task_from_lists", "train", (["a", "b"], [1.7, 0])),
    ("task_from_lists", "train", (["a", "b"], [True, 0])),
    ("task_from_lists", "name", ""),
    ("sample_episodes", "task", "review_sentiment"),
    ("sample_episodes", "split", "dev"),
    ("sample_episodes", "shot", -1),
    ("sample_episodes", "shot", "2"),
    ("sample_episodes", "n", 0),
    ("sample_episodes", "n", 10**9),
    ("sample_episodes", "seed", 1.5),
    ("sample_episodes", "stream", "other"),
    ("encoder", "lm", "model"),
    ("encoder", "max_example_tokens", 2),
    ("encoder", "template", "nope"),
    ("encode", "demos", "a fine film"),
    ("encode", "demos", [("a film", 1.7)]),
    ("encode", "query", ("a film", True)),
    ("encode", "query", 5),
    ("batch", "prompts", ["not a prompt"]),
    ("protocol_for", "task", None),
    ("protocol_for", "score", "best"),
    ("protocol_for", "shot", -2),
    ("fit", "method", "no_such_method"),
    ("fit", "method", 3),
    ("fit", "lm", None),
    ("fit", "episodes", 0),
    ("fit", "episodes", 2_000_000),
    ("fit", "seed", float("nan")),
    ("fit", "batch_size", 0),
    ("fit", "progress", "yes"),
    ("fit", "strength", "big"),
    ("fit", "no_such_setting", 1),
    ("evaluate", "split", "dev"),
    ("evaluate", "n", -3),
    ("evaluate", "shot", 1.5),
    ("evaluate", "max_example_tokens", 0),
    ("evaluate", "protocol", "dt"),
    ("save", "method", "iv"),
    ("save", "path", 5),
    ("save", "path", ""),
    ("load", "path", None),
    ("load", "lm", object()),
    ("steer", "every_position", "no"),
    ("steer", "prompt", "text"),
]


@pytest.mark.parametrize(("function", "argument", "value"), BAD, ids=[f"{f}-{a}-{v!r}" for f, a, v in BAD])
def test_a_wrong_argument_is_refused_in_one_line(env, function, argument, value):
    call = _calls(env)[function]
    with pytest.raises(UsageError) as caught:
        call(**{argument: value})
    message = str(caught.value)
    assert "\n" not in message and "accepted" in message


def test_every_public_function_has_a_row_and_works_with_good_arguments(env):
    calls = _calls(env)
    assert {f for f, _, _ in BAD} == set(calls)  # a new public function needs its rows here
    for call in calls.values():
        call()  # the good call: no exception


def test_paths_may_be_pathlib_paths(env):
    path = Path(env["dir"]) / "as_path.safetensors"
    ivlib.save(env["iv"], path, env["lm"], env["task"])
    assert ivlib.load(path, env["lm"], env["task"]).vectors is not None


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=3)), max_size=3),
    st.just(Path("x.yaml")),
)
ARGUMENTS = sorted({(f, a) for f, a, _ in BAD} - {("tiny_model", "seed"), ("fit", "no_such_setting")})


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(ARGUMENTS), VALUES)
def test_any_value_of_any_argument_works_or_is_refused_in_one_line(env, target, value):
    function, argument = target
    if isinstance(value, float) and math.isfinite(value) and abs(value) > 1e6:
        value = float(value)  # huge numbers: still only accepted or refused
    try:
        _calls(env)[function](**{argument: value})
    except UsageError as exc:
        assert "\n" not in str(exc)
    finally:
        torch.set_grad_enabled(True)
