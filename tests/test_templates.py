"""Prompt templates: every built-in one cuts each example at its answer position, under a tokenizer
that makes a space a token (the tiny models') and one that writes words with their leading space
(BPE); every method edits or reads exactly there; batched equals one at a time."""

from __future__ import annotations

import pytest
import torch
from bpe import bpe_model
from conftest import wrap

from ivlib import hooks
from ivlib.episodes import Episode, Example, sample_episodes
from ivlib.errors import UsageError
from ivlib.methods import METHODS
from ivlib.methods.dt import DeepThinking
from ivlib.methods.fv import FunctionVectors
from ivlib.methods.hc import HiddenCalibration
from ivlib.methods.i2cl import ImplicitICL
from ivlib.methods.icl import ICL, ZeroShot
from ivlib.methods.icv import InContextVectors
from ivlib.methods.iv import IterativeVectors
from ivlib.methods.probe import Probe
from ivlib.methods.site import SoftInjection
from ivlib.methods.sv import StateVector
from ivlib.methods.tv import TaskVectors
from ivlib.methods.tv_hendel import HendelTaskVectors
from ivlib.prompts import PromptEncoder
from ivlib.scoring import Scorer
from ivlib.templates import BUILTIN, IV, Template, from_mapping, named, resolve
from ivlib.tiny import TINY_ARCHS

WORDS = ["bad", "good"]
_models: dict[str, object] = {}


def model(name: str):
    if name not in _models:
        _models[name] = bpe_model() if name == "bpe" else wrap(name)
    return _models[name]


def _episode() -> Episode:
    demos = (Example("a fine, warm film", 1), Example("a dull film", 0))
    return Episode(demos, Example("a long film", 1))


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe"])
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_template_cuts_each_example_at_its_answer_position(tokenizer, name):
    lm = model(tokenizer)
    template = BUILTIN[name]
    encoder = PromptEncoder(lm.tokenizer, WORDS, True, 256, template)
    episode = _episode()
    prompt = encoder.encode(episode)
    text = template.preamble + "".join(encoder.demonstration(d) for d in episode.demos)
    text += encoder.query_context(episode.query)
    enc = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert prompt.ids[1:] == enc["input_ids"]  # BOS, then exactly the written prompt, tokenized whole
    ends = [end for _, end in enc["offset_mapping"]]
    assert prompt.sep_pos[-1] == len(prompt.ids) - 1  # the query ends at its answer position
    start = len(template.preamble)
    for demo, pos in zip(episode.demos, prompt.sep_pos):
        context_end = start + len(encoder.query_context(demo))
        # the answer position's token ends the answer context (or, where BPE merged a kept space into the
        # answer's first token, the context before that space) and the next token begins the answer
        assert ends[pos - 1] in (context_end, context_end - len(encoder.kept_space)), (name, text)
        assert ends[pos] > context_end
        assert text[ends[pos - 1] :].lstrip().startswith(encoder.answer_text(demo))
        start += len(encoder.demonstration(demo))
    # the labels' tokens are what follows the query's prompt (tokenized in that context)
    for word, tokens in zip(WORDS, encoder.label_tokens):
        whole = lm.tokenizer(text + encoder.answer_space + word, add_special_tokens=False)["input_ids"]
        assert whole[-len(tokens) :] == tokens or encoder.kept_space  # kept space: the label tokenized alone
        assert lm.tokenizer.decode(tokens).strip() == word


def test_a_space_ends_the_prompt_only_where_it_is_a_token_of_its_own():
    dt = BUILTIN["dt/sst2"]  # 'Sentiment:' + ' positive'
    bpe = PromptEncoder(model("bpe").tokenizer, WORDS, True, 256, dt)
    assert bpe.kept_space == "" and bpe.answer_space == " "  # ' good' is one BPE token: the space is the answer's
    assert [bpe.tok.convert_ids_to_tokens(t) for t in bpe.label_tokens] == [["Ġbad"], ["Ġgood"]]
    tiny = PromptEncoder(model("gpt2").tokenizer, WORDS, True, 256, dt)
    assert tiny.kept_space == " " and tiny.answer_space == ""  # a space is a token: the prompt ends with it
    staicc = PromptEncoder(model("bpe").tokenizer, WORDS, True, 256, BUILTIN["staicc/sst2"])
    assert staicc.kept_space == " "  # its prompt ends with the space whatever the tokenizer (keep_space)
    assert staicc.tok.decode(staicc.encode(_episode()).ids).endswith("sentiment: ")


def _fitted(name: str, lm, n_classes: int):
    """Each registered method with a random state of the right shapes (what predict needs)."""
    layers, d, heads, hd = lm.layout.n_layers, lm.layout.d_model, lm.layout.n_heads, lm.layout.head_dim
    g = torch.Generator().manual_seed(7)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if name in ("icl", "zero-shot"):
        return ICL() if name == "icl" else ZeroShot()
    if name == "dt":
        return DeepThinking(dt_step=2)
    builders = {
        "iv": (IterativeVectors(strength=2.0), {"vectors": rand(layers, n_classes + 1, d)}),
        "tv": (
            TaskVectors(),
            {"theta": rand(layers, d), "layer": torch.tensor(1), "layer_scores": torch.zeros(layers)},
        ),
        "fv": (
            FunctionVectors(),
            {
                "vector": rand(d),
                "layer": torch.tensor(0),
                "heads": torch.tensor([[0, 1]]),
                "effects": torch.zeros(layers, heads),
                "mean_act": rand(layers, heads, hd),
            },
        ),
        "sv": (
            StateVector(),
            {
                "vector": rand(layers, d),
                "layers": torch.tensor(2),
                "layer_scores": torch.zeros(2),
                "window_used": torch.tensor(1),
            },
        ),
        "i2cl": (
            ImplicitICL(),
            {
                "vectors": rand(layers, 2, d),
                "a": torch.rand(layers, 2, generator=g),
                "b": 1 + torch.rand(layers, 2, generator=g),
                "loss_curve": torch.zeros(1, dtype=torch.float64),
                "demonstrations": torch.tensor(2),
            },
        ),
        "site": (
            SoftInjection(),
            {
                "emb": rand(layers, heads, hd),
                "logits": rand(layers, heads),
                "chosen": torch.tensor(1),
                "loss_curve": torch.zeros(1, dtype=torch.float64),
                "val_steps": torch.tensor([1]),
                "val_loss": torch.zeros(1, dtype=torch.float64),
                "val_macro_f1": torch.zeros(1, dtype=torch.float64),
            },
        ),
    }
    builders["icv"] = (
        InContextVectors(icv_strength=0.5),
        {
            "principal": rand(layers, d),
            "mean": rand(layers, d),
            "explained_variance_ratio": torch.tensor(0.5, dtype=torch.float64),
            "demonstrations": torch.tensor(2),
        },
    )
    builders["tv-hendel"] = (HendelTaskVectors(), {"layer": torch.tensor(0), "layer_scores": torch.zeros(layers)})
    builders["hc"] = (
        HiddenCalibration(),
        {"centroids": rand(n_classes, d), "counts": torch.ones(n_classes, dtype=torch.long)},
    )
    builders["probe"] = (
        Probe(),
        {
            "mean": rand(d),
            "scale": torch.ones(d),
            "weight": rand(n_classes, d),
            "bias": rand(n_classes),
            "c": torch.tensor(1.0, dtype=torch.float64),
            "c_scores": torch.zeros(0, dtype=torch.float64),
            "counts": torch.ones(n_classes, dtype=torch.long),
            "converged": torch.tensor(1),
        },
    )
    method, state = builders[name]
    method.load_state(state)
    return method


def test_the_position_test_covers_every_registered_method():
    lm = model("gpt2")
    for name in METHODS:
        assert _fitted(name, lm, 2) is not None  # a new method needs its random state above


class _Spy:
    """Every (row, col) a position hook was built to edit or read, by kind."""

    def __init__(self, monkeypatch):
        self.sites: list[tuple[str, set[tuple[int, int]]]] = []
        for cls in (hooks.OutputSite, hooks.InputSite):
            original = cls.__init__

            def init(site, rows, cols, *args, _original=original, _kind=cls.__name__, **kwargs):
                self.sites.append((_kind, set(zip(rows.tolist(), cols.tolist()))))
                _original(site, rows, cols, *args, **kwargs)

            monkeypatch.setattr(cls, "__init__", init)


def _check_positions(name: str, spy: _Spy, batch) -> None:
    separators = set(zip(batch.sep_rows.tolist(), batch.sep_cols.tolist()))
    queries = {(r, int(c)) for r, c in enumerate(batch.query_cols.tolist())}
    edited = [positions for _, positions in spy.sites if positions]  # ICV's every-position edit lists none
    if name in ("icl", "zero-shot", "dt", "i2cl", "icv", "hc", "probe"):  # the cache; every position; read-outs
        assert not edited
        return
    assert edited
    if name == "tv-hendel":  # read at the few-shot rows' query separators, written at the zero-shot rows' last
        assert edited[0] == queries and {r for r, _ in edited[1]} == {r for r, _ in queries} == set(range(len(queries)))
        assert len(edited[1]) == len(queries)
        return
    for positions in edited:
        assert positions == (separators if name == "iv" else queries)


@pytest.mark.parametrize("template", sorted(BUILTIN))
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_edits_at_the_templates_answer_positions_and_batches_exactly(name, template, monkeypatch):
    lm = model("gpt2")
    encoder = PromptEncoder(lm.tokenizer, WORDS, True, 256, BUILTIN[template])
    method = _fitted(name, lm, 2)
    texts = ["a warm film", "a dull and long film", "the best film", "bad"]
    split_eps = [
        Episode((Example(texts[(i + 1) % 4], 1), Example(texts[(i + 2) % 4], 0)), Example(texts[i], i % 2))
        for i in range(4)
    ]
    if type(method).fixed_eval_shot == 0:
        split_eps = [e.query_only() for e in split_eps]
    prompts = [encoder.encode(e) for e in split_eps]
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    batch = scorer.batch(prompts)
    spy = _Spy(monkeypatch)
    together = method.predict(scorer, batch)
    _check_positions(name, spy, batch)
    alone = torch.cat([method.predict(scorer, scorer.batch([p])) for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("template", ["iv", "dt/sst2", "staicc/sst2", "sv"])
def test_answer_position_edits_land_and_batch_exactly_on_every_family(arch, template, task, monkeypatch):
    lm = model(arch)
    encoder = PromptEncoder(lm.tokenizer, task.label_words, True, 256, BUILTIN[template])
    prompts = [encoder.encode(e) for e in sample_episodes(task.splits["validation"], 2, 1, 4, 3, "v")]
    for name in ("iv", "tv"):
        method = _fitted(name, lm, 2)
        scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
        batch = scorer.batch(prompts)
        spy = _Spy(monkeypatch)
        together = method.predict(scorer, batch)
        _check_positions(name, spy, batch)
        monkeypatch.undo()
        alone = torch.cat([method.predict(scorer, scorer.batch([p])) for p in prompts])
        torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


# ---- definitions and their refusals ---------------------------------------------------------------


def test_templates_are_checked_when_defined():
    with pytest.raises(UsageError, match=r"\{text\} exactly once"):
        Template("t", "Review: {review}\nSentiment:")
    with pytest.raises(UsageError, match=r"\{text\} exactly once"):
        Template("t", "no field here")
    with pytest.raises(UsageError, match="nothing fixed stands between"):
        Template("t", "{text}", delimiter=" ")
    with pytest.raises(UsageError, match="separator is empty"):
        Template("t", separator="")
    with pytest.raises(UsageError, match="unknown template key 'delimeter'"):
        from_mapping("t", {"input": "{text}", "delimeter": ":"}, "test")
    literal = Template("t", "{{x}} {text}:", " ")
    assert literal.context("hi") == "{x} hi:" and literal.answer_context == ":"


def test_names_families_files_and_task_entries_resolve(tmp_path):
    assert named("dt", "sst2") is BUILTIN["dt/sst2"]
    assert named("dt", "ag_news", {"template_task": "agnews"}) is BUILTIN["dt/agnews"]
    with pytest.raises(UsageError, match="has no form for task 'emotion'"):
        named("dt", "emotion")
    with pytest.raises(UsageError, match="'nope' is unknown"):
        named("nope", "sst2")
    path = tmp_path / "mine.yaml"
    path.write_text('input: "Text: {text}\\nLabel:"\ndelimiter: " "\nseparator: "\\n"\n')
    mine = named(str(path), "sst2")
    assert mine.name == "mine" and mine.answer_context == "\nLabel:" and mine.key.startswith("mine#")
    assert resolve(None, {}, "t") is IV
    assert resolve(None, {"template": "fv"}, "t") is BUILTIN["fv"]
    assert resolve("iv", {"template": "fv"}, "t") is IV  # the run's --template wins over the entry's
    own = resolve(None, {"template": {"input": "Q: {text}\nA:", "delimiter": " "}}, "t")
    assert own.name == "t" and own.input == "Q: {text}\nA:"
