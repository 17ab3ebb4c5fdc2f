"""Deep-Thinking / Iterative Forward Tuning (Yang et al. 2023): tune the demonstrations' KV cache.

No hooks: the state is the key/value cache of the demonstrations alone (BOS + demos, L tokens).
Step 1 is plain ICL's cache. Each further step re-encodes the demonstrations with the current
cache as the past (2L positions), keeps the last L entries C_t and moves the cache towards
them with momentum, per layer, separately for keys and values:
    g_t = C_t - P_{t-1};  m_t = g_t (t = 2) or g_t + beta m_{t-1};  P_t = P_{t-1} + eta m_t.
The query (and, for multiple choice, each option) is then scored with P_t as the past, without
re-encoding the demonstrations. P and m stay float32 whatever the model's dtype.

Positions of the re-encoded copy: `shifted` (the reference, library defaults) continues them at
L..2L-1, so C_t - P also carries a position shift; `pinned` re-uses 0..L-1.

The number of steps T is chosen on validation episodes (scores after every step 1..T are
computed in one pass); the reference picked the best step on test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from typing_extensions import override

from ..episodes import Episode
from ..errors import UsageError
from ..kvcache import KV, read_kv, sliding_window, write_kv
from ..layout import ModelLayout
from ..prompts import EncodedPrompt, PromptBatch, PromptEncoder, split_demos, split_prefix
from ..scoring import Prefix, Scorer
from ..settings import MethodSettings, setting_field
from ..state import TensorSpec
from .base import Method, fitted, register

POSITIONS = ("shifted", "pinned")


@dataclass(frozen=True)
class DTSettings(MethodSettings):
    dt_steps: int = setting_field(15, "most tuning steps T tried on validation", low=1, symbol="T max")
    dt_step: int | None = setting_field(None, "use this T instead of choosing it on validation", low=1, symbol="T")
    dt_eta: float = setting_field(0.01, "step size of the cache update", symbol="eta", scales=True)
    dt_beta: float = setting_field(0.9, "momentum", symbol="beta")
    dt_positions: str = setting_field(
        "shifted",
        "positions of the re-encoded demonstrations: continue after them "
        "(shifted, the reference) or re-use theirs (pinned)",
        choices=POSITIONS,
    )


@register
class DeepThinking(Method[DTSettings]):
    name = "dt"
    position = 60
    supports_open_vocabulary = True
    needs_validation = True  # chooses the number of steps
    supports_multiple_choice = True
    caches_fixed_prefix = True  # the tuned cache is the prefix
    min_shot = 1  # the demonstrations are what it tunes
    has_state = True  # the step chosen on validation: a test run loads it instead of searching again

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step = self.settings.dt_step  # the T used at evaluation; None until chosen on validation
        self.curve: list[float] = []  # validation score after each step 1..dt_steps

    @override
    def labeled_examples(self, train: list[Episode], validation: list[Episode] | None) -> dict[str, int]:
        """Nothing is fitted; the steps are selected on validation unless --dt-step gives them."""
        return {
            "fit": 0,
            "selection": 0
            if self.settings.dt_step is not None
            else super().labeled_examples([], validation)["selection"],
        }

    def fit_summary(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "step_chosen_by": "user" if self.settings.dt_step is not None else "validation",
            "curve": [round(s, 4) for s in self.curve],
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "step": torch.tensor(fitted(self.step, self.name)),
            "curve": torch.tensor(self.curve, dtype=torch.float32),
        }

    @classmethod
    @override
    def state_spec(cls, layout: ModelLayout, n_classes: int) -> dict[str, TensorSpec]:
        return {"step": TensorSpec((), "int"), "curve": TensorSpec((None,))}  # curve: one score per step tried

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        step, curve = int(tensors["step"]), tensors["curve"].tolist()
        if step < 1 or (curve and step > len(curve)):
            raise ValueError(f"step {step} is not one of the {len(curve)} steps tried (1..{len(curve)})")
        self.step, self.curve = step, curve

    def check_prompts(self, scorer: Scorer, prompts: list[EncodedPrompt]) -> None:
        """`shifted` re-encodes the demonstrations after themselves, at positions up to 2 x (BOS + demos) - 1:
        past a learned position table that is an index error (a device assert on GPU), and past a
        rotary model's trained length it is silently out of distribution."""
        context = scorer.lm.context_length
        longest = max(p.query_start for p in prompts)
        if self.settings.dt_positions == "shifted" and context is not None and 2 * longest > context:
            raise UsageError(
                f"dt: --dt-positions shifted re-encodes {longest} demonstration tokens at positions up to "
                f"{2 * longest - 1}, beyond the context of model '{scorer.lm.name}' ({context}); accepted: "
                "--dt-positions pinned, or a lower --shot or --max-example-tokens"
            )
        _check_window(scorer, prompts)

    # ---- the tuning loop ------------------------------------------------------------------------
    @torch.inference_mode()
    def tuned(
        self, scorer: Scorer, demo_ids: torch.Tensor, demo_mask: torch.Tensor, n_demo: torch.Tensor, upto: int
    ) -> Iterator[tuple[Any, KV]]:
        """(cache, P_t) after each step t = 1..upto: the cache holds P_t in the model's dtype when it is
        yielded (a caller may extend it: it is rewritten before the next step); P_t is float32.

        demo_ids, demo_mask: [B, Ld] left-padded demonstrations; n_demo: [B] real tokens per row.
        """
        demo_pos = (demo_mask.cumsum(-1) - 1).clamp(min=0)
        _, cache = scorer.encode(demo_ids, demo_mask, demo_pos)
        name, dtype = scorer.lm.name, scorer.lm.dtype
        state: KV = [(k.float(), v.float()) for k, v in read_kv(cache, name)]
        write_kv(cache, state, dtype, name)
        yield cache, state
        momentum: KV | None = None
        width = demo_ids.shape[1]
        twice = torch.cat([demo_mask, demo_mask], dim=1)
        again_pos = demo_pos + n_demo[:, None] if self.settings.dt_positions == "shifted" else demo_pos
        for t in range(2, upto + 1):
            write_kv(cache, state, dtype, name)
            scorer.encode(demo_ids, twice, again_pos, past=cache)
            fresh = [(k[..., -width:, :].float(), v[..., -width:, :].float()) for k, v in read_kv(cache, name)]
            grads = [(ck - pk, cv - pv) for (ck, cv), (pk, pv) in zip(fresh, state)]
            momentum = (
                grads
                if momentum is None
                else [
                    (gk + self.settings.dt_beta * mk, gv + self.settings.dt_beta * mv)
                    for (gk, gv), (mk, mv) in zip(grads, momentum)
                ]
            )
            state = [
                (pk + self.settings.dt_eta * mk, pv + self.settings.dt_eta * mv)
                for (pk, pv), (mk, mv) in zip(state, momentum)
            ]
            _check_finite(state, demo_mask, t)
            write_kv(cache, state, dtype, name)
            yield cache, state

    @torch.inference_mode()
    def step_scores(
        self, scorer: Scorer, batch: PromptBatch, upto: int, trace: list[KV] | None = None, every_step: bool = True
    ) -> torch.Tensor:
        """[B, upto, C] answer scores after each step 1..upto (float32), or [B, 1, C] after step `upto`
        alone when not `every_step` (evaluation: scoring skipped steps would be wasted forwards);
        `trace` collects each step's cache."""
        demo_ids, demo_mask, query_ids, query_mask, n_demo = split_demos(batch)
        query_pos = n_demo[:, None] + (query_mask.cumsum(-1) - 1).clamp(min=0)
        out = []
        for t, (cache, state) in enumerate(self.tuned(scorer, demo_ids, demo_mask, n_demo, upto), start=1):
            if every_step or t == upto:
                out.append(scorer.score_after(cache, demo_mask, query_ids, query_mask, query_pos, batch))
            if trace is not None:
                trace.append(state)
        return torch.stack(out, dim=1)

    # ---- fixed demonstrations: tuned once, every query scored over the tuned cache ------------------
    def _tuned_prefixes(self, scorer: Scorer, batch: PromptBatch, upto: int) -> Iterator[Prefix]:
        """The one-row prefix batch (BOS + the fixed demonstrations) tuned: a `Prefix` after each step."""
        length = batch.input_ids.shape[1]
        n_demo = torch.full((1,), length, dtype=torch.long, device=batch.input_ids.device)
        for cache, _ in self.tuned(scorer, batch.input_ids, batch.attention_mask, n_demo, upto):
            yield Prefix(cache, length)

    def prefix(self, scorer: Scorer, batch: PromptBatch) -> Prefix:
        """The fixed demonstrations tuned for the chosen T, once for the whole evaluation (the paper's protocol)."""
        *_, last = self._tuned_prefixes(scorer, batch, fitted(self.step, self.name))
        return last

    def predict_over(self, scorer: Scorer, prefix: Prefix, batch: PromptBatch) -> torch.Tensor:
        """Query-only inference over the tuned cache: no demonstration is encoded again."""
        with scorer.over(prefix):
            return scorer.label_scores(batch)

    @override
    def fit(
        self, scorer: Scorer, encoder: PromptEncoder, episodes: list[Episode], validation: list[Episode] | None = None
    ) -> None:
        if self.settings.dt_step is not None:
            return
        if not validation:
            raise ValueError("DT chooses its number of steps on validation episodes")
        prompts = [encoder.encode(e) for e in validation]
        self.check_prompts(scorer, prompts)
        scores = self._fixed_step_scores(scorer, prompts) if len({e.demos for e in validation}) == 1 else None
        if scores is None:
            scores = scorer.runner.map(
                prompts, lambda b: self.step_scores(scorer, b, self.settings.dt_steps), "DT step search"
            )
        labels = np.array([p.label for p in prompts])
        mc = prompts[0].options is not None
        n = scores.shape[-1] if mc else encoder.n_classes  # options per question, or classes
        self.curve = [
            scorer.selection_score(labels, scorer.predictions(scores[:, t], prompts), n, mc)
            for t in range(self.settings.dt_steps)
        ]
        self.step = int(np.argmax(self.curve)) + 1  # ties: the fewest steps, the cheapest

    def _fixed_step_scores(self, scorer: Scorer, prompts: list[EncodedPrompt]) -> torch.Tensor | None:
        """[N, T, C] validation scores when every prompt shares its demonstrations (--demos fixed): they are
        tuned once and each step's cache scores the queries alone. None when the prompts cannot be cut so."""
        shared, queries, differ = split_prefix(prompts)
        if differ or not shared.ids:
            return None
        scorer.check_context(max(len(p.ids) for p in prompts))  # the query batches do not hold the prefix
        steps = []
        for t, prefix in enumerate(
            self._tuned_prefixes(scorer, scorer.batch([shared]), self.settings.dt_steps), start=1
        ):
            steps.append(
                scorer.runner.map(queries, partial(self.predict_over, scorer, prefix), f"DT step search, T={t}")
            )
        return torch.stack(steps, dim=1)

    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        return self.step_scores(scorer, batch, fitted(self.step, self.name), every_step=False)[:, -1]


def _check_window(scorer: Scorer, prompts: list[EncodedPrompt]) -> None:
    """On a sliding-window model DT runs only where the window changes nothing: the demonstrations
    re-encoded after themselves (2L cache positions, whatever --dt-positions: windows count cache
    slots) and the whole prompt must fit, with nothing dropped from the cache (transformers keeps
    window - 1 entries). Then every sliding layer attends as a full one, so DT is the method it is on
    full attention; beyond the window the tuned entries would fall out of view mid-step."""
    window = sliding_window(scorer.lm.model.config)
    if window is None:
        return
    longest = max(p.query_start for p in prompts)  # BOS + demonstrations
    # a batch pads demonstrations and queries apart (split_demos), so its span is the longest of each
    query = max(len(p.ids) - p.query_start + max((len(o) for o in p.options or []), default=0) for p in prompts)
    need = max(2 * longest + 1, longest + query)
    if need > window:
        raise UsageError(
            f"dt: model '{scorer.lm.name}' has a {window}-token sliding window and these prompts need {need} "
            f"positions inside it ({longest} demonstration tokens twice, plus one; or {longest} plus {query} "
            "for the query); accepted: prompts that fit the window: a lower --shot or --max-example-tokens"
        )


def _check_finite(state: KV, demo_mask: torch.Tensor, step: int) -> None:
    """A tuned cache that overflowed would be scored silently; name the layer instead (one sync per step)."""
    pad = ~demo_mask.bool()[:, None, :, None]  # pads are masked out of attention; their values do not matter
    ok = torch.stack([(torch.isfinite(k) | pad).all() & (torch.isfinite(v) | pad).all() for k, v in state])
    if not bool(ok.all()):
        layer = int((~ok).nonzero()[0])
        raise UsageError(
            f"dt: non-finite values in the tuned cache at layer {layer}, step {step}; "
            "lower --dt-eta or run with --no-half"
        )
