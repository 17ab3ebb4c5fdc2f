"""Paper presets: each release's own protocol as one flag (`--preset dt`), so "DT as its authors ran
it" is one word on the command line and one key in the record.

A preset sets what its release does: the prompt template, the scoring rule, the demonstrations
(how many, fresh or fixed), the test-set size, the seed and the metric a selection maximises, and
the method settings its paper uses; the flags a command gives win over it, each such override said
in one line and recorded (`preset.overridden`). The values and the files they mirror are in the
README's preset table (and each `Preset.source`). A preset is a starting point that matches a
release's protocol, not its bugs: selection stays on validation, extraction on train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class Preset:
    name: str
    source: str  # the release files the values mirror
    values: dict[str, Any]  # setting name (the flags' dest) -> value
    seeds: tuple[int, ...] = (42,)  # the seeds the release runs; a run takes the first unless --seed says
    note: str = ""  # what ivlib cannot mirror, in a phrase
    method: str | None = None  # the method the preset is for (a run of another method takes the protocol only)
    extra: dict[str, Any] = field(default_factory=dict)  # the release's method settings (for `method` only)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "iv",
            "ArkciaTheDragon/iterative-vectors util.py (Verbalizer), iv.py, args.py, script.sh",
            {
                "template": "iv",
                "tokenize": "pieces",  # its Verbalizer: input, "\n", label, "\n\n\n" each tokenized alone
                "score": "first-token",
                "shot": 1,
                "ext_shot": 1,  # args.py's -s default (script.sh sweeps 1..4)
                "demos": "episodic",
                "eval_episodes": 10_000,
                "select_episodes": 200,
                "episodes": 200,
                "metric": "macro",
            },
            note="the release fits on its test split and orders 1-shot prompts by class; ivlib fits on train",
            method="iv",
            extra={"ext_batch": 10},
        ),
        Preset(
            "dt",
            "DAMO-ConvAI deep-thinking/tasks/<task>.py, task_logprob_main.py, scripts/run_main_*.sh",
            {"template": "dt", "score": "full", "shot": 1, "demos": "fixed", "metric": "accuracy"},
            seeds=(0, 1, 2, 3, 4),
            note="the release scores every test item once and picks its step count on test; ivlib draws -n queries "
            "and picks it on validation",
            method="dt",
            extra={"dt_steps": 15, "dt_eta": 0.01, "dt_beta": 0.9},
        ),
        Preset(
            "i2cl",
            "LzVv123456/I2CL configs/config_i2cl.py, run_i2cl.py, my_datasets/<task>.py, evaluator.py",
            {
                "template": "i2cl",
                "score": "first-token",
                "shot": 5,
                "ext_shot": 5,
                "demos": "fixed",
                "eval_episodes": 500,
                "metric": "accuracy",
            },
            seeds=(42, 43, 44, 45, 46),
            note="the release's 500 test queries are class-balanced and its demonstrations one random set per run",
            method="i2cl",
            extra={"i2cl_sets": 1},
        ),
        Preset(
            "fv",
            "ericwtodd/function_vectors src/utils/prompt_utils.py, src/evaluate_function_vector.py",
            {
                "template": "fv",
                "score": "vocab",
                "shot": 10,
                "demos": "episodic",
                "metric": "accuracy",
                "ext_shot": 10,
                "episodes": 100,
            },
            note="the release reports FV only on test items that 10-shot ICL gets right",
            method="fv",
            extra={"ie_episodes": 25, "n_top_heads": 10},
        ),
        Preset(
            "sv",
            "HITsz-TMG/ICL-State-Vector TVframework.py, state_vector_optimize.py",
            {"template": "sv", "score": "vocab", "shot": 10, "ext_shot": 10, "demos": "fixed", "metric": "accuracy"},
            seeds=(233,),
            note="the release's scripts score only its first 10 test items and take L from a per-task table",
            method="sv",
        ),
        Preset(
            "site",
            "SNU-DRL/Soft_Injection preprocess.py, eval.py, eval_scripts/eval_site.sh",
            {
                "template": "site",
                "score": "generate",
                "max_new_tokens": 20,
                "shot": 10,
                "ext_shot": 10,
                "episodes": 50,
                "metric": "accuracy",
            },
            note="the release matches a prefix of the generation after its own normalisation; ivlib the whole stripped answer",
            method="site",
            extra={"site_steps": 400, "site_lr": 0.2, "site_batch": 1, "site_val_every": 50},
        ),
        Preset(
            "tv-hendel",
            "roeehendel/icl_task_vectors core/data/datasets/few_shot_format.py, core/task_vectors.py, "
            "scripts/experiments/main.py",
            {
                "template": "hendel",
                "score": "vocab",
                "shot": 5,
                "demos": "episodic",
                "select_episodes": 50,
                "eval_episodes": 50,
                "metric": "accuracy",
            },
            seeds=(41,),
            note="the release reads its vector after a dummy query and judges one generated token",
            method="tv-hendel",
        ),
        Preset(
            "staicc",
            "hc495/StaICC util/configs.py, util/dataset_interface.py, prefabricate_inference/model_kernel.py",
            {
                "template": "staicc",
                "score": "first-token",
                "shot": 4,
                "demos": "episodic",
                "demo_draw": "any",
                "demo_source": "train",
                "queries": "each",
                "inputs": "verbatim",
                "bos": "tokenizer",
                "eval_episodes": 1024,
                "metric": "accuracy",
            },
            note="StaICC's k = 4 demonstrations drawn regardless of class from its demonstration set (use the "
            "staicc-bench/* tasks, whose train is that set and test its 512 queries), each test query twice, "
            "its inputs as stored and its prompts begun as the tokenizer's own call begins them (SmolLM2: no BOS); "
            "its own generator draws other rows than ivlib's; it scores the label's last token where ivlib scores "
            "the first (the same for its single-token label words); docs/reproductions.md compares the two",
        ),
    ]
}


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(f"--preset '{name}' is unknown; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]


def values(preset: Preset, method: str) -> dict[str, Any]:
    """What the preset sets for a run of `method`: its protocol and run values, its first seed, and its
    method settings when `method` is the preset's own."""
    return {**preset.values, "seed": preset.seeds[0], **(preset.extra if method == preset.method else {})}


def apply(preset: Preset, method: str, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values, overridden): the preset's values under the given ones, and the given values that differ
    from the preset's (each said and recorded)."""
    own = values(preset, method)
    overridden = {k: v for k, v in given.items() if k in own and v is not None and v != own[k]}
    return {**own, **{k: v for k, v in given.items() if v is not None}}, overridden
