"""Prompt templates: how one example is written, as lm-evaluation-harness's `doc_to_text`,
`target_delimiter` and `fewshot_delimiter` say it.

A prompt is `preamble`, then each demonstration as `input` (its text in place of `{text}`) +
`delimiter` + its answer + `separator`, then the query as `input` + `delimiter`, cut where the
answer would begin. Prompt wording moves few-shot accuracy by many points, so a number is only
comparable with a paper's under that paper's template: the releases' templates are built in
(`BUILTIN`, each naming the file it mirrors), a task entry in the registry may name or define its
own, and `--template NAME|FILE` overrides both for a run.

Where the query is cut is decided per tokenizer by the encoder (`prompts.PromptEncoder`): the
delimiter's trailing spaces go with the answer when the tokenizer writes a word with its leading
space (" positive", BPE and SentencePiece), and stay in the prompt when a space is a token of its
own. The token that ends the cut prompt is the answer position: where every method edits or reads
"the separator", for every template.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError
from .yamlread import read_yaml

FIELD = "text"  # the one placeholder: the example's input text (a pair task's fields joined, as today)
FIELDS = ("name", "input", "delimiter", "separator", "preamble", "keep_space")
MAX_TEMPLATE_FILE = 64 * 1024  # a template is a few lines; a bigger file is not one


@dataclass(frozen=True)
class Template:
    """How one example is written; `name` is what records and `select` show."""

    name: str
    input: str = "{text}"  # the input part; `{text}` is the example's text ({{ and }} for literal braces)
    delimiter: str = "\n"  # between the input and the answer (IV's: a newline)
    separator: str = "\n\n\n"  # between examples (IV's: three newlines)
    preamble: str = ""  # before the first example (instructions), or nothing
    keep_space: bool = False  # the delimiter's trailing spaces end the prompt whatever the tokenizer (StaICC's)

    def __post_init__(self) -> None:
        where = f"template '{self.name}'"
        if not isinstance(self.keep_space, bool):
            raise UsageError(f"{where}: keep_space {self.keep_space!r} is not accepted; accepted: true or false")
        for key in FIELDS[:-1]:
            if not isinstance(getattr(self, key), str):
                raise UsageError(f"{where}: {key} {getattr(self, key)!r} is not a string; accepted: a string")
        if not self.name.strip():
            raise UsageError("a template needs a non-empty name")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.input) if f is not None]
        except ValueError as exc:
            raise UsageError(
                f"{where}: input {self.input!r} is not a format string ({exc}); accepted: '{{text}}' once"
            ) from None
        if fields != [FIELD]:
            found = ", ".join(f"{{{f}}}" for f in fields) or "no field"
            raise UsageError(
                f"{where}: input {self.input!r} has {found}; accepted: the input field {{{FIELD}}} exactly once "
                "(literal braces as {{ and }})"
            )
        if not self.separator:
            raise UsageError(f"{where}: separator is empty; accepted: text between examples, e.g. '\\n\\n'")
        if not self.answer_context:
            raise UsageError(
                f"{where}: nothing fixed stands between the input and the answer ({self.input!r} + {self.delimiter!r}); "
                "accepted: a delimiter or an input ending in text, e.g. delimiter '\\n' or input 'Q: {text}\\nA:'"
            )

    @property
    def head(self) -> str:
        """The input's fixed text before the example's text ('Review: ')."""
        return self.input.split("{" + FIELD + "}")[0].format()

    @property
    def answer_context(self) -> str:
        """The fixed text that always ends the query before the answer: the input's tail after the
        text and the delimiter without its trailing spaces ('\\nSentiment:', '\\n'). Labels are
        tokenized after it, so their tokens are the ones the prompt is followed by."""
        tail = self.input.split("{" + FIELD + "}", 1)[1].format()
        return tail + self.delimiter.rstrip(" ")

    @property
    def answer_space(self) -> str:
        """The delimiter's trailing spaces: with the prompt or with the answer, per tokenizer (with the
        prompt always when `keep_space`)."""
        return self.delimiter[len(self.delimiter.rstrip(" ")) :]

    def context(self, text: str) -> str:
        """An example's text up to its answer context (spaces of the delimiter not included)."""
        return self.input.replace("{" + FIELD + "}", "\0").format().replace("\0", text) + self.delimiter.rstrip(" ")

    @property
    def stop(self) -> str:
        """Where a generated answer ends: the separator's first line break, else the separator itself."""
        return "\n" if "\n" in self.separator else self.separator

    def definition(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> str:
        """What a record's hyperparameters hold: a built-in's name, or a name and a digest of the text
        (a template edited under the same name is another protocol, and --resume must not match it)."""
        if BUILTIN.get(self.name) == self:
            return self.name
        digest = hashlib.sha256(json.dumps(self.definition(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.name}#{digest}"


IV = Template("iv")  # the default: the IV release's prompt (its `x\n` + label, examples three newlines apart)


def _per_task(family: str, tasks: dict[str, str], delimiter: str, separator: str) -> list[Template]:
    """A release's templates that differ per task only in the input's wording: `family/task`."""
    return [Template(f"{family}/{task}", text, delimiter, separator) for task, text in tasks.items()]


# StaICC's input and label prefixes per dataset (hc495/StaICC util/hgf_dataset_loader.py)
_STAICC = {
    "sst2": ("sentence: ", "sentiment"),
    "mr": ("review: ", "sentiment"),
    "financial_phrasebank": ("sentence: ", "sentiment"),
    "sst5": ("sentence: ", "sentiment"),
    "trec": ("question: ", "target"),
    "agnews": ("news: ", "topic"),
    "subj": ("review: ", "subjectiveness"),
    "tweet_eval_emotion": ("tweet: ", "emotion"),
    "tweet_eval_hate": ("tweet: ", "hate speech"),
    "hate_speech18": ("tweet: ", "hate speech"),
}

# The releases' own, by name; the README's "Templates" table gives the file each mirrors. A name that
# is a family (`dt`, `i2cl`, `staicc`) resolves per task: `dt` on sst2 is `dt/sst2` (see `named`).
BUILTIN: dict[str, Template] = {
    t.name: t
    for t in [
        IV,
        # Deep-Thinking (DAMO-ConvAI deep-thinking/tasks/<task>.py): the answer is ' ' + label
        *_per_task(
            "dt",
            {
                "sst2": "Review: {text}\nSentiment:",
                "sst5": "Review: {text}\nSentiment:",
                "mr": "Review: {text}\nSentiment:",
                "trec": "Question: {text}\nType:",
                "agnews": "Article: {text}\nCategory:",
            },
            " ",
            "\n\n",
        ),
        # I2CL (LzVv123456/I2CL my_datasets/<task>.py, configs/config_i2cl.py)
        *_per_task(
            "i2cl",
            {
                "sst2": "Review: {text}\nSentiment:",
                "sst5": "Sentence: {text}\nSentiment:",
                "mr": "Review: {text}\nSentiment:",
                "trec": "Question: {text}\nAnswer Type:",
                "agnews": "News: {text}\nType:",
                "subj": "Sentence: {text}\nLabel:",
                "hate_speech18": "Text: {text}\nLabel:",
                "emo": "Dialogue: {text}\nEmotion:",
                "dbpedia": "Input: {text}\nLabel:",
            },
            " ",
            "\n",
        ),
        # StaICC (util/dataset_interface.py): the prompt ends with the label prefix's space, the label
        # follows without one
        *[
            Template(f"staicc/{task}", f"{prefix}{{text}} {label}:", " ", "\n", keep_space=True)
            for task, (prefix, label) in _STAICC.items()
        ],
        # Function Vectors (ericwtodd/function_vectors src/utils/prompt_utils.py); SITE writes the same
        Template("fv", "Q: {text}\nA:", " ", "\n\n"),
        Template("site", "Q: {text}\nA:", " ", "\n\n"),
        # State Vector (HITsz-TMG/ICL-State-Vector TVframework.py): x, an arrow, y, no spaces
        Template("sv", "{text}", "\u2192", "\n\n"),
        # Task Vectors (roeehendel/icl_task_vectors core/data/datasets/few_shot_format.py), with the
        # spaces its mapping tasks put before inputs and outputs
        Template("hendel", "example: {text}", "-> ", "\n"),
        # Hidden Calibration (hc495/Hidden_Calibration util/prompting.py): the prompt ends with a space
        Template("hc", "Input: {text}", ", Label: ", "\n", keep_space=True),
    ]
}
FAMILIES = sorted({name.split("/")[0] for name in BUILTIN if "/" in name})


def from_mapping(name: str, value: dict[str, Any], where: str) -> Template:
    """A template defined in YAML/JSON (a task entry's `template:` or a --template file)."""
    unknown = sorted(set(value) - set(FIELDS))
    if unknown:
        raise UsageError(f"{where}: unknown template key '{unknown[0]}'; accepted: {', '.join(FIELDS)}")
    if "input" not in value:
        raise UsageError(f"{where}: a template needs 'input' (e.g. 'Review: {{text}}\\nSentiment:')")
    fields = {k: v for k, v in value.items() if k != "name"}
    return Template(str(value.get("name", name)), **fields)


def from_file(path: str) -> Template:
    """A --template FILE: YAML or JSON with `input` and optionally delimiter, separator, preamble,
    keep_space, name (default: the file's stem)."""
    p = Path(path)
    value = read_yaml("--template", p, MAX_TEMPLATE_FILE, "a built-in name or a UTF-8 YAML template file")
    if not isinstance(value, dict):
        raise UsageError(f"--template '{path}' holds no mapping; accepted: keys {', '.join(FIELDS)}")
    return from_mapping(p.stem, value, f"--template '{path}'")


def resolve(given: str | Template | None, task_entry: dict[str, Any] | None, task: str) -> Template:
    """The run's template: the one given (a Template, a built-in name or family, or a file), else the
    task entry's own (a name or a definition), else IV's."""
    if isinstance(given, Template):
        return given
    entry = task_entry or {}
    if given is None:
        own = entry.get("template")
        if own is None:
            return IV
        if isinstance(own, dict):
            return from_mapping(task, own, f"task '{task}' template")
        given = str(own)
    return named(given, task, entry)


def named(name: str, task: str, entry: dict[str, Any] | None = None) -> Template:
    """A built-in template by name; a family (`dt`) by the task's own form (`dt/sst2`), the task
    known by its entry's `template_task` or its name; else a file by path."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name in FAMILIES:
        key = str((entry or {}).get("template_task", task))
        if f"{name}/{key}" in BUILTIN:
            return BUILTIN[f"{name}/{key}"]
        forms = ", ".join(n.split("/", 1)[1] for n in BUILTIN if n.startswith(name + "/"))
        raise UsageError(
            f"--template {name} has no form for task '{task}'; accepted: a task it has one for ({forms}; "
            "a task entry's template_task names which), or another template"
        )
    if Path(name).suffix in (".yaml", ".yml", ".json") or Path(name).is_file():
        return from_file(name)
    plain = ", ".join(n for n in BUILTIN if "/" not in n)
    raise UsageError(
        f"--template '{name}' is unknown; accepted: {plain}, a family resolved per task ({', '.join(FAMILIES)}), "
        "a family's form (e.g. dt/sst2), or a YAML file with 'input'"
    )
