"""The registry's schema: what each key of a model or task entry accepts, checked when a config
file is read, so a wrong value is refused with the file, the entry, the key, the value and what is
accepted, before anything is loaded; never coerced (YAML's `yes` is not a label name, `.inf` is not
a head count) and never left to fail later in a library's traceback.

pydantic does the checking (strict: no silent coercion of types); the messages are ivlib's, one
line each. A key a method reads from the model entry (`Setting.model_default`, e.g. FV's
`fv_heads`) is declared here too, with the type the method's setting accepts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic_core import ErrorDetails

from .errors import UsageError
from .staicc import DATASETS as STAICC_DATASETS
from .staicc import INSTALL as STAICC_INSTALL
from .staicc import SplitMode

Text = Annotated[StrictStr, Field(min_length=1)]
Texts = Annotated[list[Text], Field(min_length=1)]
Files = Text | Texts


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Layout(_Strict):
    blocks: Text | None = None
    attn_out: Text | None = None
    mlp_out: Text | None = None


class ModelEntry(_Strict):
    path: Text | None = None
    gguf_file: Text | None = None
    package: Text | None = None
    assemble: Annotated[StrictStr, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")] | None = None
    builtin: Text | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer: Text | None = None
    bos: Literal["auto"] | StrictBool | None = None
    layout: Layout | None = None
    trust_remote_code: StrictBool | None = None
    fv_heads: Annotated[StrictInt, Field(ge=1)] | None = None


class MultipleChoice(_Strict):
    options: Files
    answer: Text
    option_keys: Text | None = None
    answer_base: Literal[0, 1] | None = None


class OpenVocabulary(_Strict):
    input: Text | None = None
    output: Text | None = None


class TemplateEntry(_Strict):
    name: Text | None = None
    input: StrictStr
    delimiter: StrictStr | None = None
    separator: Annotated[StrictStr, Field(min_length=1)] | None = None
    preamble: StrictStr | None = None
    keep_space: StrictBool | None = None


class TaskEntry(_Strict):
    dataset: Text | None = None
    subset: Text | None = None
    data_files: Files | Annotated[dict[StrictStr, Files], Field(min_length=1)] | None = None
    splits: dict[Literal["train", "validation", "test"], Text] | None = None
    text_fields: Files | None = None
    label_field: Text | None = None
    label_names: Annotated[list[Text], Field(min_length=2)] | None = None
    label_words: Annotated[list[Text], Field(min_length=2)] | None = None
    builtin: Text | None = None
    multiple_choice: MultipleChoice | None = None
    open_vocabulary: OpenVocabulary | None = None
    template: Text | TemplateEntry | None = None
    template_task: Text | None = None
    staicc: Text | None = None
    staicc_split: SplitMode | None = None


# key -> what it accepts, as the error message (and README) says it
MODEL_KEYS = {
    "path": "a local directory or hub id (a non-empty string)",
    "gguf_file": "the GGUF file name inside `path` (or inside `package`), a string",
    "package": "an installed Python package whose folder holds the weights (not imported), a string",
    "assemble": "module:function of an installed package that writes the GGUF file and returns its path "
    "(multi-part packages; called once, the result cached)",
    "builtin": "a model built from a config at run time (tiny-gpt2, tiny-llama, ...)",
    "dtype": "float32, float16 or bfloat16",
    "tokenizer": "a tokenizer directory or hub id, when it differs from `path` (a string)",
    "bos": "auto, true or false (add the tokenizer's BOS token)",
    "layout": "module names when discovery fails: {blocks: NAME, attn_out: NAME, mlp_out: NAME}",
    "trust_remote_code": "true or false (pass trust_remote_code to from_pretrained)",
    "fv_heads": "an integer >= 1 (function-vector heads for this model, the IV paper's settings)",
}
TASK_KEYS = {
    "dataset": "a hub dataset id, or parquet/csv/json for local files (a string)",
    "subset": "a dataset configuration name (a string)",
    "data_files": "a local file, a list of files, or {split: file or [files]}",
    "splits": "{train: NAME, validation: NAME, test: NAME} (split names as strings)",
    "text_fields": "a text column or a list of them (joined with a space)",
    "label_field": "the label column (a string; default: label)",
    "label_names": "a list of two or more class names as strings (quote yes/no/on/off and numbers), "
    "when the label column is not a ClassLabel",
    "label_words": "a list of two or more words the model predicts, one per class, as strings "
    "(quote yes/no/on/off and numbers)",
    "builtin": "a task whose data ivlib generates itself (a string)",
    "multiple_choice": "{options: FIELD or [FIELDS], answer: FIELD, option_keys: FIELD, answer_base: 0 or 1}",
    "open_vocabulary": "{input: COLUMN, output: COLUMN} (default input, output): each input's answer is any text",
    "template": "a template name (iv, dt, fv, ... or a family's form such as dt/sst2) or {input: 'Review: {text}"
    "\\nSentiment:', delimiter, separator, preamble, keep_space}: the task's prompt unless --template is given",
    "template_task": "the task a template family's forms know this one as (sst2, mr, agnews, trec, ...), a string",
    "staicc": f"a dataset StaICC ships, one of {', '.join(STAICC_DATASETS)} (needs {STAICC_INSTALL})",
    "staicc_split": "original (the hub's order and splits, missing ones carved) or benchmark (StaICC's own "
    "calibration/demonstration/test split, as validation/train/test)",
}
STAICC_KEYS = ("staicc", "staicc_split", "splits", "label_words", "template", "template_task")  # a StaICC task's keys
MC_KEYS = {
    "options": "a field or a list of fields (strings)",
    "answer": "the answer field (a string)",
    "option_keys": "the field of the options' keys (a string)",
    "answer_base": "0 or 1 (the index of the first option in a numeric answer)",
}
SOURCES = {
    "models": ("path", "package", "assemble", "builtin"),
    "tasks": ("dataset", "data_files", "builtin", "staicc"),
}
_SCHEMAS: dict[str, tuple[type[BaseModel], dict[str, str]]] = {
    "models": (ModelEntry, MODEL_KEYS),
    "tasks": (TaskEntry, TASK_KEYS),
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _message(path: str, label: str, entry: dict[str, Any], error: ErrorDetails, keys: dict[str, str]) -> str:
    """One line for pydantic's first complaint: the key (one level into multiple_choice/layout), its
    value, and what the key accepts."""
    loc = [str(part) for part in error["loc"]]
    key = loc[0]
    if error["type"] == "extra_forbidden":
        if len(loc) > 1 and key in ("multiple_choice", "layout"):
            inner = MC_KEYS if key == "multiple_choice" else {"blocks": "", "attn_out": "", "mlp_out": ""}
            return f"config '{path}': unknown key '{label}.{key}.{loc[-1]}'; accepted: {', '.join(inner)}"
        return f"config '{path}': unknown key '{label}.{key}'; accepted: {', '.join(keys)}"
    value = entry.get(key)
    accepted = keys[key]
    if key == "multiple_choice" and isinstance(value, dict) and len(loc) > 1 and loc[1] in MC_KEYS:
        key, value, accepted = f"{key}.{loc[1]}", value.get(loc[1], "(missing)"), MC_KEYS[loc[1]]
    return f"config '{path}': {label}.{key} {_short(value)} is not accepted; accepted: {accepted}"


def check_entry(kind: str, name: str, entry: dict[str, Any], path: str) -> None:
    """Refuse an entry that does not fit the schema (UsageError, one line naming file, entry, key, value)."""
    schema, keys = _SCHEMAS[kind]
    empty = [key for key, value in entry.items() if value is None and key in keys]
    if empty:  # `label_words:` with nothing after it: a value forgotten, never "use the default"
        raise UsageError(f"config '{path}': {kind}.{name}.{empty[0]} has no value; accepted: {keys[empty[0]]}")
    try:
        schema.model_validate(entry)
    except ValidationError as exc:
        errors = exc.errors()
        extra = [e for e in errors if e["type"] == "extra_forbidden"]  # an unknown key first: likely a typo
        raise UsageError(_message(path, f"{kind}.{name}", entry, (extra or errors)[0], keys)) from None
    if not any(key in entry for key in SOURCES[kind]):
        raise UsageError(
            f"config '{path}': {kind}.{name} has none of {', '.join(SOURCES[kind])}; accepted: one of them"
        )
    if kind == "tasks":
        _check_staicc(name, entry, path)


def _check_staicc(name: str, entry: dict[str, Any], path: str) -> None:
    """A StaICC entry names a dataset StaICC ships and only the keys that apply to it (its data fixes
    the columns, classes and source)."""
    label = f"config '{path}': tasks.{name}"
    if "staicc" not in entry:
        if "staicc_split" in entry:
            raise UsageError(f"{label}.staicc_split applies to StaICC tasks only; accepted: add staicc: DATASET")
        return
    if entry["staicc"] not in STAICC_DATASETS:
        raise UsageError(f"{label}.staicc {_short(entry['staicc'])} is not accepted; accepted: {TASK_KEYS['staicc']}")
    other = [key for key in entry if key not in STAICC_KEYS]
    if other:
        raise UsageError(
            f"{label}: key '{other[0]}' does not apply to a StaICC task; accepted with staicc: {', '.join(STAICC_KEYS)}"
        )
