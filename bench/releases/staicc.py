"""StaICC's own evaluation (hc495/StaICC, the installed `StaICC` package) on ivlib's model, beside ivlib's
`--preset staicc` on the same dataset.

StaICC fixes a protocol and leaves the model to the user: its `single_experimentor` draws k = 4
demonstrations per query from its demonstration set with its own generator, writes each prompt with its
template, asks a `forward_inference(prompt, label_space)` for label probabilities and scores every test
query twice. This harness runs that code as it is, with its own `standard_ICL_inference_with_torch_Causal_LM`
as the forward function, and replaces only the model (ivlib's loader: both sides run the same weights).
The data are StaICC's own files, read by its own loader.

Three checks:
  splits    ivlib's staicc-bench task, loaded with --inputs verbatim, holds StaICC's own calibration,
            demonstration and test rows (texts, labels, order) as its validation, train and test.
  prompts   for the first --prompts queries, StaICC's demonstrations and query, posed by ivlib's encoder
            as --preset staicc poses them (the staicc template, --inputs verbatim, --bos tokenizer): the
            text and token ids must equal StaICC's prompt's. A mismatch names the query and the first
            differing character.
  accuracy  StaICC's accuracy over its 1,024 prompts, with ivlib's bootstrap interval, to set beside
            `python iv.py -m MODEL -t staicc-bench/TASK --method icl --preset staicc --run-test`.

    python bench/releases/staicc.py                  # sst2 on SmolLM2: prompts, then StaICC's 1,024 answers
    python bench/releases/staicc.py --prompts-only   # the split and prompt checks alone (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import io
from typing import Any

import harness
from harness import UsageError

# ivlib's StaICC names -> the package's loader function (StaICC/util/hgf_dataset_loader.py)
LOADERS = {
    "sst2": "glue_sst2",
    "rotten_tomatoes": "rotten_tomatoes",
    "financial_phrasebank": "financial_phrasebank",
    "sst5": "sst5",
    "trec": "trec",
    "ag_news": "agnews",
    "subjective": "subjective",
    "tweet_eval_emotion": "tweet_eval_emotion",
    "tweet_eval_hate": "tweet_eval_hate",
    "hate_speech18": "hate_speech_18",
}


# the datasets StaICC's `Normal` benchmark splits by its own per-dataset sizes (StaICC/normal.py), and the
# key of those sizes in its configs (the others take its standard 1,024 / 4,096 / 512)
OWN_SPLITS = {"financial_phrasebank": "split_for_FP", "tweet_eval_emotion": "split_for_TEE"}


def experimentor(name: str, k: int) -> Any:
    """StaICC's experimentor for one dataset, built as its `Normal` benchmark builds each (its prints muted)."""
    from StaICC.util import configs, hgf_dataset_loader
    from StaICC.util import experimentor as staicc_experimentor

    sizes = configs.STANDARD_SETTINGS.get(OWN_SPLITS.get(name, ""))
    dividing = {"dividing": [sizes[f"{s}_number"] for s in ("calibration", "demonstration", "test")]} if sizes else {}
    with contextlib.redirect_stdout(io.StringIO()):
        data = getattr(hgf_dataset_loader, LOADERS[name])()
        return staicc_experimentor.single_experimentor(original_dataset=data, k=k, **dividing)


def _text(value: Any) -> str:
    """StaICC keeps an input as a list of fields; its single-input datasets have one."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def check_prompts(exp: Any, lm: Any, task: Any, n: int) -> int:
    """Queries 0..n-1 (first repetition) posed by ivlib as `--preset staicc` poses them (the staicc
    template, inputs verbatim, the prompt begun as the tokenizer's own call begins it): the text must be
    StaICC's and the token ids its tokenizer call's, or the check stops naming the first difference.
    Returns how many were checked."""
    from ivlib.episodes import Episode, Example
    from ivlib.prompts import PromptEncoder
    from ivlib.templates import named

    template = named("staicc", task.name, task.prompt)
    enc = PromptEncoder(lm.tokenizer, task.label_words, "tokenizer", 10_000, template, strip=False)
    demos_set, test = exp.triplet_dataset.demonstration, exp.triplet_dataset.test
    for i in range(n):
        lines = [(_text(demos_set.get_input_text(d)), demos_set.get_label(d)) for d in exp.demonstration_sampler[i]]
        demos = tuple(Example(t, demos_set.find_index_from_label(word)) for t, word in lines)
        query = Example(_text(test.get_input_text(i)), 0)
        ours = enc.encode(Episode(demos, query))
        text = "".join([enc.template.preamble, *(enc.demonstration(d) for d in demos), enc.query_context(query)])
        theirs = exp._get_prompts_for_test_sample(i, 0)
        if text != theirs:
            at = next((j for j, (a, b) in enumerate(zip(text, theirs)) if a != b), min(len(text), len(theirs)))
            raise SystemExit(
                f"query {i}: prompts differ at character {at}: ivlib {text[at : at + 40]!r}, StaICC {theirs[at : at + 40]!r}"
            )
        if ours.ids != list(lm.tokenizer(theirs).input_ids):
            raise SystemExit(f"query {i}: ivlib's token ids are not StaICC's tokenizer call's: {ours.ids[:5]}")
    return n


ROLES = {"demonstration": "train", "calibration": "validation", "test": "test"}  # StaICC's split -> ivlib's role


def check_splits(exp: Any, task: Any) -> dict[str, int]:
    """ivlib's staicc-bench task holds StaICC's own triplet: each split's texts and labels, in StaICC's
    order (ivlib drops empty texts, and counts them); a difference stops the check, naming the row."""
    sizes = {}
    for name, role in ROLES.items():
        split = getattr(exp.triplet_dataset, name)
        theirs = [(_text(split.get_input_text(i)), split.get_label(i)) for i in range(len(split))]
        theirs = [(t, task.label_words.index(w) if w in task.label_words else w) for t, w in theirs if t.strip()]
        ours = list(zip(task.splits[role].texts, task.splits[role].labels.tolist()))
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise SystemExit(
                f"{name} (ivlib's {role}) differs at row {at} of {len(theirs)}: ivlib has {len(ours)} rows"
            )
        sizes[role] = len(ours)
    return sizes


class WithBos:
    """The tokenizer with the model's BOS put first, as ivlib poses every prompt (`--as-ivlib`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str, **kwargs: Any) -> Any:
        out = self.tokenizer(text, **kwargs)
        bos = self.tokenizer.bos_token_id
        ids = out.input_ids
        out["input_ids"] = [bos, *ids] if isinstance(ids, list) else ids.new_tensor([[bos, *ids[0].tolist()]])
        return out


def as_ivlib(exp: Any) -> None:
    """StaICC's inputs with their surrounding whitespace stripped, as ivlib loads every task (`--as-ivlib`)."""
    for split in (exp.triplet_dataset.demonstration, exp.triplet_dataset.test):
        read = split.get_input_text
        split.get_input_text = lambda i, read=read: [t.strip() for t in read(i)]


def answers(exp: Any, lm: Any, bos: bool = False) -> tuple[list[int], list[int]]:
    """StaICC's run of its own forward function over its prompts: (gold, predicted) per prompt."""
    import numpy as np
    from StaICC.prefabricate_inference import model_kernel

    tokenizer = WithBos(lm.tokenizer) if bos else lm.tokenizer

    def forward(prompt: str, label_space: list[str]) -> Any:
        return model_kernel.standard_ICL_inference_with_torch_Causal_LM(
            prompt, lm.model, tokenizer, label_space, cache_empty=None
        )

    with contextlib.redirect_stdout(io.StringIO()):
        metrics, _, outputs = exp(forward_inference=forward, return_outputs=True)
    gold = [int(g) for g in outputs["groundtruth"]]  # each test query's class, once per repetition
    pred = [int(np.argmax(p)) for p in outputs["prob."]]
    accuracy = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    if abs(accuracy - metrics["accuracy"]) > 1e-9:
        raise SystemExit(f"the answers read ({accuracy}) do not give StaICC's accuracy ({metrics['accuracy']})")
    return gold, pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-t", "--task", default="sst2", help=f"StaICC dataset, one of {', '.join(LOADERS)} (default sst2)")
    ap.add_argument("-m", "--model", default="smollm2-135m", help="ivlib registry model (default smollm2-135m)")
    ap.add_argument("-c", "--config", action="append", help="ivlib registries (default: the harnesses')")
    ap.add_argument("--prompts", type=int, default=200, help="queries whose prompts are checked (default 200)")
    ap.add_argument("--prompts-only", action="store_true", help="check the prompts, answer nothing")
    ap.add_argument(
        "--as-ivlib",
        action="store_true",
        help="a diagnosis, not StaICC's protocol: its inputs stripped and the model's BOS first, as ivlib poses "
        "them, so the rest of a difference is the draw of demonstrations",
    )
    ap.add_argument("--out", help="JSON summary (default results/releases/staicc-TASK[-as-ivlib].json)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared cores)")
    args = ap.parse_args()
    if args.task not in LOADERS:
        raise UsageError(f"-t {args.task} is not a StaICC dataset; accepted: {', '.join(LOADERS)}")
    import torch

    torch.set_num_threads(harness.positive("--threads", args.threads))
    lm = harness.load_lm(args.model, args.config)
    task = harness.load_ivlib_task(f"staicc-bench/{args.task}", args.config, inputs="verbatim")
    exp = experimentor(args.task, k=4)
    sizes = check_splits(exp, task)
    print(f"splits: ivlib's staicc-bench/{args.task} holds StaICC's own rows and labels, in its order: {sizes}")
    checked = check_prompts(exp, lm, task, harness.positive("--prompts", args.prompts))
    print(
        f"prompts: of {checked} queries, ivlib's --preset staicc writes StaICC's very text for all, and the "
        "token ids of StaICC's tokenizer call (inputs verbatim, --bos tokenizer)"
    )
    if args.prompts_only:
        return
    if args.as_ivlib:
        as_ivlib(exp)
    gold, pred = answers(exp, lm, bos=args.as_ivlib)
    scores = harness.summary(gold, pred, len(task.label_words), seed=42)
    data = {"release": "StaICC", "task": args.task, "model": args.model, "as_ivlib": args.as_ivlib, **scores}
    data |= harness.run_context() | {"samples": harness.sample_lines(list(range(len(gold))), gold, pred)}
    out = harness.write_summary(args.out, f"staicc-{args.task}" + ("-as-ivlib" if args.as_ivlib else ""), data)
    print(
        f"StaICC's own run: accuracy {harness.pct(scores['accuracy'])}, macro-F1 {harness.pct(scores['macro'])}, {len(gold)} prompts -> {out}"
    )


if __name__ == "__main__":
    harness.guarded(main, "staicc.py")
