"""The interface every method implements, and the registry that makes a method one file.

A method is a `Method` subclass decorated with `@register`. It declares its settings once, as a
frozen dataclass (`class Mine(Method[MySettings])`, see `ivlib.settings.MethodSettings`), and what
it is able to do as class attributes: what it needs from the protocol (`needs_fit`,
`needs_validation`, ...), what it can steer and how (`steers`), whether it takes the run's seed
(`takes_seed`), its place among the methods (`position`). The runner, the CLI's flags, `--resume`,
`--save/--load-vectors`, `select`, the report, `ivlib.steer` and the model registry's schema learn
everything about it from those declarations. Its constructor takes exactly its settings
(positionally in declaration order, or by name) and checks them, so a method built from Python is
validated like one built from flags.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, Literal

import torch
from typing_extensions import TypeVar

from .. import budget
from ..episodes import Episode
from ..errors import UsageError
from ..hooks import Edit
from ..layout import ModelLayout
from ..models import LoadedModel
from ..prompts import EncodedPrompt, PromptBatch, PromptEncoder
from ..protocol import RULES
from ..scoring import Prefix, Scorer
from ..settings import EVAL, FIT, SEED, MethodSettings, NoSettings, Setting
from ..state import TensorSpec, check_tensors

# How a method can steer a caller's own forward (`ivlib.steer`): "prompt", at a prompt's positions (what
# its evaluation edits); "every_position", at every position of every forward, generated tokens too.
Steering = Literal["prompt", "every_position"]
STEERING: tuple[Steering, ...] = ("prompt", "every_position")

S = TypeVar("S", bound=MethodSettings, default=MethodSettings, covariant=True)


class Method(ABC, Generic[S]):
    name: ClassVar[str]
    # the settings' dataclass, taken from the base `Method[MySettings]` (`NoSettings` when none is named)
    settings_type: ClassVar[type[MethodSettings]] = NoSettings
    # its place among the methods: the report's columns and every list (`--help`, `methods`, messages),
    # lower first; None: after those that declare one, by name
    position: ClassVar[int | None] = None
    takes_seed: ClassVar[bool] = False  # whether it draws at random: the run's seed is its `seed` then
    # how it can steer a caller's forward (`Steering`); () for none. A method that steers builds its
    # edit in `edit`; with "every_position" that edit has `steady` vectors or a `transform`
    steers: ClassVar[tuple[Steering, ...]] = ()
    needs_fit: ClassVar[bool] = False  # whether `fit` uses training episodes at all
    needs_validation: ClassVar[bool] = False  # whether `fit` also selects something on validation episodes
    # whether its training prompts are drawn as its evaluation prompts are (--shot and --demo-draw, the
    # record's ext_shot then --shot) rather than with -s: a calibration on prompts like those it classifies
    fits_at_eval_shot: ClassVar[bool] = False
    fixed_eval_shot: ClassVar[int | None] = None  # e.g. zero-shot evaluates with no demonstrations
    min_shot: ClassVar[int] = 0  # fewest evaluation demonstrations per class it can work with
    supports_multiple_choice: ClassVar[bool] = False  # whether it can score per-question answer options
    # whether it can run an open-vocabulary task (input -> any text, no classes): not one that builds
    # anything per class (IV's class vectors, I2CL's and HC's per-label calibration, the probe)
    supports_open_vocabulary: ClassVar[bool] = False
    # the scoring rules (--score, see `ivlib.rules`) it can be judged by: a method whose edits are the
    # prompt's (paused over the answer's continuation and decoding) can be judged by any of them
    scoring_rules: ClassVar[tuple[str, ...]] = RULES
    scoring_note: ClassVar[str] = ""  # why it is judged by those alone, for the message refusing another
    has_state: ClassVar[bool] = False  # whether fitting leaves tensors worth saving (--save-vectors)
    # --demos fixed (one demonstration set for every query): whether the method can be evaluated so at all
    # (a method that needs its demonstrations per query cannot), and whether its scores stay exact when the
    # shared prefix is encoded once (`prefix` + `predict_over`): true only if `predict`'s edits touch the
    # query's positions alone, or `prefix` applies the ones at the demonstrations. Otherwise every prompt runs whole.
    supports_fixed_demos: ClassVar[bool] = True
    caches_fixed_prefix: ClassVar[bool] = False
    # the report's heatmap of a validation grid: (x, y, one panel per value of) setting names
    grid_axes: ClassVar[tuple[str, str, str] | None] = None
    settings: S  # the checked settings: `self.settings.strength`
    seed: int  # the run's seed (what it draws, for a method that `takes_seed`)
    fit_info: dict[str, Any] | None = None  # how it was fitted (set by ivlib.fit / ivlib.load; saved with the state)
    fit_budget: dict[str, Any] | None = None  # what its fit consumed (ivlib.budget; set and saved likewise)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            if typing.get_origin(base) is Method:
                (cls.settings_type,) = typing.get_args(base)

    def __init__(self, *args: Any, seed: int | None = None, **kwargs: Any) -> None:
        cls = type(self)
        if seed is not None and not cls.takes_seed:
            raise TypeError(f"{cls.__name__} takes no seed (it draws nothing at random)")
        self.seed = SEED.check(SEED.default if seed is None else seed)
        self.settings = typing.cast(S, cls.settings_type.bind(args, kwargs, cls.__name__))

    @classmethod
    def from_settings(cls, values: dict[str, Any], seed: int) -> Method:
        """Build from setting values; `seed` is the run's, taken by a method that draws at random."""
        return cls(**values, seed=seed) if cls.takes_seed else cls(**values)

    def with_settings(self, **values: Any) -> Method:
        """A copy of this method (its fitted state shared) with other values of some settings, checked."""
        copied = copy.copy(self)
        copied.settings = dataclasses.replace(self.settings, **values)
        return copied

    @classmethod
    def declared_settings(cls) -> tuple[Setting, ...]:
        """Its settings' declarations, in order (flags, checks, record keys)."""
        return cls.settings_type.declared()

    @classmethod
    def setting(cls, name: str) -> Setting:
        for s in cls.declared_settings():
            if s.name == name:
                return s
        raise KeyError(name)

    @classmethod
    def eval_settings(cls) -> tuple[Setting, ...]:
        """Settings applied at evaluation only: several values of them share one fit."""
        return tuple(s for s in cls.declared_settings() if s.role == EVAL)

    @classmethod
    def fit_settings(cls) -> tuple[Setting, ...]:
        """Settings that define what fitting computes (saved with the state, adopted on load)."""
        return tuple(s for s in cls.declared_settings() if s.role == FIT)

    @classmethod
    def scaling_flags(cls) -> tuple[str, ...]:
        """Flags of the settings that scale the method's edits (`Setting.scales`): what an overflow asks
        the user to lower."""
        return tuple(s.flag for s in cls.declared_settings() if s.scales)

    @classmethod
    def registry_keys(cls) -> dict[str, Setting]:
        """The model-registry keys it reads (`Setting.model_default`: FV's `fv_heads`), each with the setting
        whose default it replaces (so the schema accepts what that setting accepts)."""
        return {s.model_default: s for s in cls.declared_settings() if s.model_default is not None}

    def hyperparameters(self) -> dict[str, Any]:
        """The method's settings as the run record names them (what --resume and select match)."""
        return self.settings.values()

    def fit(
        self, scorer: Scorer, encoder: PromptEncoder, episodes: list[Episode], validation: list[Episode] | None = None
    ) -> None:
        """Learn from training episodes; `validation` is given to methods that select on it."""

    def labeled_examples(self, train: list[Episode], validation: list[Episode] | None) -> dict[str, int]:
        """Distinct labeled examples the fit used ("fit") and its selection on validation used
        ("selection"), for the record's budget. The default: the training episodes' demonstrations (a
        query's label is not read) and every example of the validation episodes a method selects on;
        a method that reads other labels, or fewer, says so here."""
        return {
            "fit": budget.distinct(budget.demonstrations(train)) if self.needs_fit else 0,
            "selection": budget.distinct(budget.demonstrations(validation or []) + budget.queries(validation or [])),
        }

    def fit_summary(self) -> dict[str, Any]:
        """What fitting chose (a layer, heads...), for the run record."""
        return {}

    def check_prompts(self, scorer: Scorer, prompts: list[EncodedPrompt]) -> None:
        """Refuse, before any compute, prompts (or a model) this method cannot run; the context-length
        check every method shares is `Scorer.batch`."""

    @abstractmethod
    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        """[B, n_classes] label scores for a batch of evaluation prompts."""

    def edit(self, lm: LoadedModel, batch: PromptBatch) -> Edit:
        """What it does to one forward over `batch` (a method that declares `steers`): its evaluation edit,
        which `predict` applies and `ivlib.steer` applies to a caller's own forwards."""
        raise NotImplementedError(f"{self.name} steers nothing")

    def prefix(self, scorer: Scorer, batch: PromptBatch) -> Prefix:
        """The shared prefix (a one-row batch of BOS + the fixed demonstrations) encoded once, as the
        method's full forwards would encode it (`caches_fixed_prefix` methods only)."""
        return scorer.encode_prefix(batch)

    def predict_over(self, scorer: Scorer, prefix: Prefix, batch: PromptBatch) -> torch.Tensor:
        """[B, n_classes] scores of query-only prompts after `prefix`: `predict`'s, its forwards over the cache."""
        with scorer.over(prefix):
            return self.predict(scorer, batch)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that make a fitted method reusable (saved with --save-vectors)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError(f"{self.name} has no state to load")

    @classmethod
    def state_spec(cls, layout: ModelLayout, n_classes: int) -> dict[str, TensorSpec] | None:
        """The tensors `state()` holds for this model layout and task (name -> shape, kind, range), so a
        loaded file that would steer with the wrong vectors is refused before `load_state` sees it.
        A method with state should declare it; without one (None) a file is checked against its own
        metadata only and `load_state`'s failures become one line."""

    def restore(self, path: str, tensors: dict[str, torch.Tensor], layout: ModelLayout, n_classes: int) -> None:
        """`load_state` for a state file, after checking every tensor against `state_spec`."""
        spec = self.state_spec(layout, n_classes)
        if spec is not None:
            check_tensors(path, tensors, spec, self.name)
        try:
            self.load_state(tensors)
        except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as exc:
            raise UsageError(
                f"--load-vectors '{path}' does not fit method {self.name} ({type(exc).__name__}: {exc}); "
                f"accepted: a file saved by --save-vectors with --method {self.name} for this model and task"
            ) from None


T = TypeVar("T")


def fitted(value: T | None, method: str) -> T:
    """A fitted attribute, or a clear error when the method was neither fitted nor loaded."""
    if value is None:
        raise RuntimeError(f"{method}: fit the method or load its state first")
    return value


METHODS: dict[str, type[Method]] = {}  # --method name -> class, in the declared order (`position`)

M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator: make a method known to the runner, the CLI, select, the report and the schema."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"a method named '{name}' is already registered ({METHODS[name].__name__})")
    cls.declared_settings()  # a settings class that is not one (not frozen, a field without a declaration) fails here
    unknown = [s for s in cls.steers if s not in STEERING]
    if unknown:
        raise TypeError(f"{cls.__name__}.steers: '{unknown[0]}' is not one of {', '.join(STEERING)}")
    if cls.steers and cls.edit is Method.edit:
        raise TypeError(f"{cls.__name__} declares `steers` but builds no `edit`")
    odd = [key for key in cls.registry_keys() if not key.isidentifier()]
    if odd:
        raise TypeError(f"{cls.__name__}: model-registry key '{odd[0]}' is not a name (letters, digits, _)")
    METHODS[name] = cls
    ordered = sorted(METHODS.values(), key=_place)
    METHODS.clear()
    METHODS.update((c.name, c) for c in ordered)
    return cls


def _place(cls: type[Method]) -> tuple[bool, int, str]:
    """The registry's order: declared positions first (lowest first), then the others by name."""
    return (cls.position is None, cls.position or 0, cls.name)


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise UsageError(f"--method '{name}' is unknown; accepted: {', '.join(METHODS)}")
    return METHODS[name]
