"""How a query is posed and judged, as one frozen value: the demonstrations (how many, drawn afresh
or fixed, in which order), the prompt template, the scoring rule and the headline metric.

Built once per run, by the CLI (from flags) and by the Python API (from arguments) alike, through
`Protocol.build`, which checks every value; `check` then refuses what a method or a task cannot
run, before any model loads. The record (`fields`), `--resume`, `select`'s keeping apart of
protocols (`APART`) and the report read their keys from here, and only values other than the
defaults are recorded, so records made before a setting existed still match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import templates
from .episodes import DEMO_DRAWS, DEMO_ORDER, DEMO_SOURCES, QUERY_DRAWS, Drawing
from .errors import UsageError
from .settings import Setting
from .tasks import INPUTS
from .templates import Template

if TYPE_CHECKING:
    from .methods.base import Method

DEMOS = ("episodic", "fixed")
TOKENIZE = ("prompt", "pieces")  # a prompt tokenized as one text, or piece by piece (the IV release's Verbalizer)
BOS = ("model", "tokenizer")  # a prompt's first token: the model entry's add_bos, or what the tokenizer's own call adds
RULES = ("first-token", "full", "full-mean", "vocab", "generate")  # the scoring rules (see `rules`)
LAST_TOKEN_RULES = ("first-token", "vocab")  # computable from the answer position's logits alone
METRICS = ("macro", "accuracy")  # what a method selecting on validation maximises (TV's layer, DT's steps...)
KINDS = ("classification", "multiple_choice", "open_vocabulary")
KIND_RULES = {"classification": "first-token", "multiple_choice": "full-mean", "open_vocabulary": "vocab"}  # each's own
KIND_ACCEPTS = {
    "classification": RULES,
    "multiple_choice": ("full", "full-mean"),
    "open_vocabulary": ("vocab", "generate"),
}
KIND_WHY = {
    "classification": "",
    "multiple_choice": "its options are ranked by their log-probability",
    "open_vocabulary": "its answer is any text: the model's own top token or generation is judged",
}

SETTINGS = (
    Setting("shot", int, 1, "evaluation demonstrations per class (multiple choice: in all)", low=0),
    Setting(
        "demos",
        str,
        "episodic",
        "evaluation demonstrations: drawn afresh for every query (episodic, the IV paper's protocol) or one set "
        "of --shot per class from train for every query (fixed, Deep-Thinking's; the shared prefix is encoded once)",
        choices=DEMOS,
    ),
    DEMO_ORDER,
    Setting(
        "demo_draw",
        str,
        "per-class",
        "evaluation demonstrations: --shot of each class (per-class, the IV paper's) or --shot in all, drawn "
        "regardless of class (any, StaICC's); multiple-choice and open-vocabulary tasks always draw in all",
        choices=DEMO_DRAWS,
    ),
    Setting(
        "demo_source",
        str,
        "split",
        "where episodic demonstrations come from: the evaluated split itself (split, the IV release's) or train "
        "(StaICC's demonstration set); the queries are always the evaluated split's",
        choices=DEMO_SOURCES,
    ),
    Setting(
        "queries",
        str,
        "random",
        "evaluation queries: drawn at random with replacement (random) or each row of the split in turn, "
        "starting over once all are used (each: StaICC's, its 512 test rows twice with -n 1024)",
        choices=QUERY_DRAWS,
    ),
    Setting(
        "template",
        str,
        None,
        "prompt template: a built-in name (iv, the default, or a release's: see the README's Templates) or a "
        "YAML file with input/delimiter/separator/preamble (default: the task entry's, else iv)",
        optional=True,
    ),
    Setting(
        "inputs",
        str,
        "stripped",
        "input texts: whitespace around each removed (stripped) or kept as stored (verbatim, as releases that "
        "pass a dataset's texts through unchanged write them: StaICC's SST-2 inputs end with a space)",
        choices=INPUTS,
    ),
    Setting(
        "bos",
        str,
        "model",
        "a prompt's first token: the model entry's add_bos (model: BOS where the tokenizer has one) or what the "
        "tokenizer's own call puts before a text (tokenizer, as releases that call tokenizer(prompt) get: none "
        "for SmolLM2, BOS for Gemma)",
        choices=BOS,
    ),
    Setting(
        "tokenize",
        str,
        "prompt",
        "how a prompt becomes tokens: the whole text in one call (prompt), or each piece in its own call, the "
        "template's fixed text, the input, the answer and the separator (pieces, as the IV release's Verbalizer "
        "does: where the tokenizer merges across a join, e.g. SmolLM2's three newlines before a word, the ids differ)",
        choices=TOKENIZE,
    ),
    Setting(
        "score",
        str,
        None,
        "scoring rule: first-token (label first tokens), full (whole-label log-prob, summed), full-mean (per "
        "token), vocab (top-1 over the vocabulary), generate (greedy, exact match) (default: first-token; "
        "multiple choice: full-mean; open vocabulary: vocab)",
        choices=RULES,
        optional=True,
    ),
    Setting(
        "metric",
        str,
        "macro",
        "headline metric a method selecting on validation maximises (tv's layer, sv's L, dt's steps): macro "
        "(macro-F1) or accuracy; multiple choice always accuracy",
        choices=METRICS,
    ),
    Setting(
        "max_new_tokens",
        int,
        None,
        "--score generate: tokens decoded at most (default: the longest label's + 2)",
        low=1,
        high=4096,
        optional=True,
    ),
)
BY_NAME = {s.name: s for s in SETTINGS}
# protocol values that are protocols rather than hyperparameters: select and the report keep each
# value's records apart as a method of its own (`icl@fixed`, `icl@class`, `iv@dt`)
DRAWING = ("demo_draw", "demo_source", "queries")  # how episodes are drawn: `Drawing`'s fields
WRITING = ("inputs", "bos", "tokenize")  # how a prompt's text becomes tokens beyond its template
APART = ("demos", "demo_order", *DRAWING, "template", *WRITING, "scoring")
_DEFAULT_MARKS = {**{k: BY_NAME[k].default for k in ("demos", "demo_order", *DRAWING, *WRITING)}, "template": "iv"}


def marks(hyperparameters: dict[str, Any]) -> list[str]:
    """The protocol values a record's hyperparameters hold that keep it apart (`fixed`, `class`,
    `dt/sst2`, `full`): defaults are not recorded, and are skipped if a record has them anyway."""
    return [str(hyperparameters[k]) for k in APART if hyperparameters.get(k) not in (None, _DEFAULT_MARKS.get(k))]


@dataclass(frozen=True)
class Protocol:
    shot: int = 1
    demos: str = "episodic"
    demo_order: str = "shuffled"
    demo_draw: str = "per-class"
    demo_source: str = "split"
    queries: str = "random"
    template: Template = field(default=templates.IV)
    inputs: str = "stripped"
    bos: str = "model"
    tokenize: str = "prompt"
    scoring: str | None = None  # None: the task kind's own rule (KIND_RULES)
    metric: str = "macro"
    max_new_tokens: int | None = None

    @classmethod
    def build(
        cls,
        *,
        shot: Any = 1,
        demos: Any = "episodic",
        demo_order: Any = "shuffled",
        demo_draw: Any = "per-class",
        demo_source: Any = "split",
        queries: Any = "random",
        template: str | Template | None = None,
        inputs: Any = "stripped",
        bos: Any = "model",
        tokenize: Any = "prompt",
        score: Any = None,
        metric: Any = "macro",
        max_new_tokens: Any = None,
        task: str = "",
        task_entry: dict[str, Any] | None = None,
    ) -> Protocol:
        """Every value checked by its declared setting (the CLI's checks, for Python callers too); the
        template resolved (a name, a file, or the task entry's own)."""
        if template is not None and not isinstance(template, Template):
            template = BY_NAME["template"].check(template)
        return cls(
            shot=BY_NAME["shot"].check(shot),
            demos=BY_NAME["demos"].check(demos),
            demo_order=BY_NAME["demo_order"].check(demo_order),
            demo_draw=BY_NAME["demo_draw"].check(demo_draw),
            demo_source=BY_NAME["demo_source"].check(demo_source),
            queries=BY_NAME["queries"].check(queries),
            template=templates.resolve(template, task_entry, task),
            inputs=BY_NAME["inputs"].check(inputs),
            bos=BY_NAME["bos"].check(bos),
            tokenize=BY_NAME["tokenize"].check(tokenize),
            scoring=BY_NAME["score"].check(score),
            metric=BY_NAME["metric"].check(metric),
            max_new_tokens=BY_NAME["max_new_tokens"].check(max_new_tokens),
        )

    # ---- what it means for one method and task ----------------------------------------------------
    def eval_shot(self, cls: type[Method]) -> int:
        """Demonstrations per class in evaluation prompts (zero-shot and readouts fix theirs)."""
        return self.shot if cls.fixed_eval_shot is None else cls.fixed_eval_shot

    def fit_shot(self, cls: type[Method], ext_shot: int) -> int:
        """Training prompts' demonstrations (per class, or in all under --demo-draw any): -s, or the
        evaluation's for a method that calibrates on prompts like those it classifies (HC)."""
        return self.eval_shot(cls) if cls.fits_at_eval_shot else ext_shot

    def fit_drawing(self, cls: type[Method]) -> Drawing:
        """How training episodes are drawn (from train): per class, or as evaluation draws them for a
        method calibrating on evaluation-like prompts."""
        return Drawing(per_class=self.drawing.per_class) if cls.fits_at_eval_shot else Drawing()

    @property
    def one_set(self) -> bool:
        """Whether the run has one demonstration set (--demos fixed, with demonstrations to fix) that
        evaluation prompts, and the validation prompts a method selects on, all share."""
        return self.demos == "fixed" and self.shot > 0

    def fixed(self, cls: type[Method]) -> bool:
        """Whether this method's evaluation prompts share the one set (zero-shot has none to share)."""
        return self.one_set and self.eval_shot(cls) > 0

    @property
    def drawing(self) -> Drawing:
        """How evaluation (and selection) episodes are drawn."""
        return Drawing(self.demo_draw == "per-class", self.demo_source == "train", self.queries == "each")

    def rule(self, kind: str) -> str:
        """The scoring rule, given or the task kind's own (`KIND_RULES`)."""
        return self.scoring or KIND_RULES[kind]

    def check(self, cls: type[Method], kind: str, methods: dict[str, type[Method]]) -> None:
        """Refuse, in one line, what this method or task cannot run under this protocol."""
        shot = self.eval_shot(cls)
        if shot < cls.min_shot:
            raise UsageError(
                f"--shot {self.shot} is too few for --method {cls.name}; accepted: --shot "
                f"{cls.min_shot} or more with --method {cls.name}"
            )
        if self.fixed(cls) and not cls.supports_fixed_demos:
            accepted = ", ".join(name for name, c in methods.items() if c.supports_fixed_demos)
            raise UsageError(f"--demos fixed does not apply to --method {cls.name}; accepted with: {accepted}")
        rule = self.rule(kind)
        if rule not in KIND_ACCEPTS[kind]:
            raise UsageError(
                f"--score {rule} does not apply to a {kind.replace('_', '-')} task ({KIND_WHY[kind]}); "
                f"accepted: {', '.join(KIND_ACCEPTS[kind])}"
            )
        if kind != "classification" and self.demo_order != DEMO_ORDER.default:
            raise UsageError(
                f"--demo-order {self.demo_order} needs classes to sort by; a {kind.replace('_', '-')} task has "
                "none; accepted: --demo-order shuffled"
            )
        self._check_drawing()
        if rule not in cls.scoring_rules:
            accepted = ", ".join(name for name, c in methods.items() if rule in c.scoring_rules)
            why = cls.scoring_note or f"it is judged by {', '.join(cls.scoring_rules)}"
            raise UsageError(
                f"--score {rule} does not apply to --method {cls.name} ({why}); accepted with --score {rule}: "
                f"{accepted}"
            )

    def _check_drawing(self) -> None:
        """--demos fixed draws its one set from train, --shot per class: episodic draws' options do not apply."""
        changed = [s for s in ("demo_draw", "demo_source") if getattr(self, s) != BY_NAME[s].default]
        if self.one_set and changed:
            flag = "--" + changed[0].replace("_", "-")
            raise UsageError(
                f"{flag} {getattr(self, changed[0])} applies to episodic demonstrations, and --demos fixed draws "
                f"one set of --shot per class from train; accepted: {flag} {BY_NAME[changed[0]].default} with "
                "--demos fixed, or --demos episodic"
            )

    def drawn(self, shot: int) -> dict[str, Any]:
        """The record's keys of how episodes were drawn, where not the defaults (demonstrations' options
        only when there are demonstrations)."""
        names = DRAWING if shot > 0 and not self.one_set else ("queries",)
        return {k: getattr(self, k) for k in names if getattr(self, k) != BY_NAME[k].default}

    # ---- what records hold --------------------------------------------------------------------------
    def fields(self, cls: type[Method], kind: str) -> dict[str, Any]:
        """The record's protocol keys (what --resume matches and select keeps apart): `shot` always;
        the others only when not the default, so records made before they existed still match."""
        shot = self.eval_shot(cls)
        out: dict[str, Any] = {"shot": shot}
        if self.fixed(cls):
            out["demos"] = "fixed"
        if self.demo_order != DEMO_ORDER.default and shot > 0:  # prompts without demonstrations have no order
            out["demo_order"] = self.demo_order
        out.update(self.drawn(shot))
        out.update(self.posing(kind))
        if cls.needs_validation and self.metric != BY_NAME["metric"].default and kind == "classification":
            out["metric"] = self.metric
        if self.rule(kind) == "generate" and self.max_new_tokens is not None:
            out["max_new_tokens"] = self.max_new_tokens
        return out

    def posing(self, kind: str) -> dict[str, Any]:
        """Template, inputs, BOS and scoring rule, where not the defaults (the task kind's own rule is the
        default)."""
        out: dict[str, Any] = {}
        if self.template != templates.IV:
            out["template"] = self.template.key
        out.update({k: getattr(self, k) for k in WRITING if getattr(self, k) != BY_NAME[k].default})
        rule = self.rule(kind)
        if rule != KIND_RULES[kind]:
            out["scoring"] = rule
        return out

    def fit_fields(self, cls: type[Method], kind: str) -> dict[str, Any]:
        """What a state file records of the protocol it was fitted under, and a load must match: the
        template, inputs and BOS (the prompts it learned from); for a method selecting on validation also
        the rule, metric, demonstration order and draw it selected with; for one calibrating on prompts
        drawn as the evaluated ones are (HC), that draw (per class or in all), the one set and the order."""
        posing = self.posing(kind)
        if cls.needs_validation:
            out = dict(posing)
            if self.demo_order != DEMO_ORDER.default and self.shot > 0:
                out["demo_order"] = self.demo_order
            out.update(self.drawn(self.shot))  # the validation episodes it selected on
            if self.metric != BY_NAME["metric"].default and kind == "classification":
                out["metric"] = self.metric
            return out
        out = {k: v for k, v in posing.items() if k in ("template", *WRITING)}
        if cls.fits_at_eval_shot:  # its calibration prompts' demonstrations: `fit_drawing`, `as_evaluated`
            if self.fixed(cls):
                out["demos"] = "fixed"
            if self.demo_order != DEMO_ORDER.default and self.eval_shot(cls) > 0:
                out["demo_order"] = self.demo_order
            out.update({k: v for k, v in self.drawn(self.shot).items() if k == "demo_draw"})
        return out


DEFAULT = Protocol()
