"""Every supported family, as a tiny random model: layout found, edits exact, batching harmless."""

import pytest
import torch
from conftest import wrap
from torch import nn

from ivlib.episodes import sample_episodes
from ivlib.errors import UsageError
from ivlib.hooks import edit_outputs, stack_reads, watch_outputs
from ivlib.layout import discover_layout
from ivlib.methods.i2cl import ImplicitICL
from ivlib.methods.icl import ICL
from ivlib.methods.iv import IterativeVectors
from ivlib.prompts import PromptEncoder
from ivlib.scoring import Scorer
from ivlib.tiny import TINY_ARCHS

GQA = {"llama", "qwen2", "mistral", "gemma", "gemma3", "mistral_sw"}
_cache = {}


def tiny(arch):
    if arch not in _cache:
        _cache[arch] = wrap(arch)
    return _cache[arch]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_layout_is_discovered(arch):
    lm = tiny(arch)
    layout = lm.layout
    assert layout.n_layers == 2 and layout.d_model == 64 and layout.n_heads == 4
    assert layout.n_kv_heads == (2 if arch in GQA else 4)
    ids = torch.tensor([[5, 6, 7]])
    with edit_outputs(layout.attn_out, torch.tensor([0]), torch.tensor([1]), read=True) as sites:
        lm.model(input_ids=ids)
    assert stack_reads(sites).shape == (2, 1, 64)
    assert all("mlp" not in n for n, m in lm.model.named_modules() if any(m is a for a in layout.attn_out))
    # the MLP output (I2CL's second site): a module of each block returning [B, T, D], not the attention
    shapes = []
    with watch_outputs(layout.mlp_out, lambda _i, hidden: shapes.append(hidden.shape)):
        lm.model(input_ids=ids)
    assert [s.numel() for s in shapes] == [3 * 64] * 2  # [1, 3, 64], or OPT's flattened [3, 64]
    assert all(m is lm.layout.blocks[i].get_submodule(layout.mlp_out_path) for i, m in enumerate(layout.mlp_out))
    assert not any(m is a for m in layout.mlp_out for a in layout.attn_out) and "attn" not in layout.mlp_out_path


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_edit_changes_exactly_the_given_positions(arch):
    lm = tiny(arch)
    ids = torch.randint(10, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    everywhere_r = torch.arange(2).repeat_interleave(7)
    everywhere_c = torch.arange(7).repeat(2)
    module = lm.layout.attn_out[:1]  # layer 0
    with torch.no_grad(), edit_outputs(module, everywhere_r, everywhere_c, read=True) as sites:
        base_logits = lm.model(input_ids=ids).logits
    base = sites[0].value.view(2, 7, -1)
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([4, 2, 6])
    vec = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with (
        torch.no_grad(),
        edit_outputs(module, rows, cols, add=[vec]),
        edit_outputs(module, everywhere_r, everywhere_c, read=True) as after,  # runs after the add
    ):
        logits = lm.model(input_ids=ids).logits
    diff = after[0].value.view(2, 7, -1) - base
    expected = torch.zeros_like(diff)
    expected[rows, cols] = vec
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=0)
    # causality: positions before a row's first edit keep their logits
    torch.testing.assert_close(logits[0, :4], base_logits[0, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, :2], base_logits[1, :2], atol=1e-5, rtol=0)
    assert not torch.allclose(logits[0, 4:], base_logits[0, 4:], atol=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_equals_one_at_a_time(arch, task):
    lm = tiny(arch)
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    prompts = [encoder.encode(e) for e in sample_episodes(task.splits["validation"], 2, 1, 6, 11, "v")]
    iv = IterativeVectors(strength=1.0, ext_strength=0.5, ext_batch=0)
    iv.load_state({"vectors": torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2))})
    i2cl = ImplicitICL()
    g = torch.Generator().manual_seed(4)
    i2cl.vectors, i2cl.a, i2cl.b = (
        torch.randn(2, 2, 64, generator=g),
        torch.rand(2, 2, generator=g),
        1 + torch.rand(2, 2),
    )
    for method in (ICL(), iv, i2cl):
        outs = []
        for bs in (1, 6):
            scorer = Scorer(lm, encoder.label_ids, bs, quiet=True)
            outs.append(scorer.runner.map(prompts, lambda b: method.predict(scorer, b), "t"))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_i2cl_fits_with_gradients_on_every_family(arch, task):
    lm = tiny(arch)
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    train = sample_episodes(task.splits["train"], 2, 1, 2, 14, "t")
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    i2cl = ImplicitICL(i2cl_epochs=2, i2cl_lr=0.05)
    i2cl.fit(scorer, encoder, train)
    assert i2cl.vectors.shape == (2, 2, 64) and torch.isfinite(i2cl.vectors).all()
    assert not torch.equal(i2cl.a, torch.full((2, 2), 0.1))  # the gradients reached a on this family
    batch = scorer.batch([encoder.encode(e.query_only()) for e in train])
    assert not torch.allclose(i2cl.predict(scorer, batch), ICL().predict(scorer, batch), atol=1e-6)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = nn.Module()
        self.mixer.proj = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.mixer.proj(x)


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 3})()
        self.stack = nn.ModuleList([_Block() for _ in range(3)])


def test_unknown_architecture_is_a_clear_error_and_yaml_names_fix_it():
    with pytest.raises(UsageError, match="layout:"):
        discover_layout(_Odd())
    layout = discover_layout(_Odd(), {"blocks": "stack", "attn_out": "mixer.proj"})
    assert layout.n_layers == 3 and layout.attn_out[2] is layout.blocks[2].mixer.proj
    with pytest.raises(UsageError, match="mlp_out"):  # asked for only by the methods that need it
        print(layout.mlp_out)
    named = discover_layout(_Odd(), {"blocks": "stack", "attn_out": "mixer.proj", "mlp_out": "mixer"})
    assert named.mlp_out[1] is named.blocks[1].mixer and named.mlp_out_path == "mixer"
    with pytest.raises(UsageError, match="layout"):
        discover_layout(_Odd(), {"blocks": "stack", "attn_out": "mixer.nope"})


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prefix_cache_then_last_token_equals_full_forward(arch, task):
    """The KV-cache path the layer search uses, on every family's cache implementation."""
    from ivlib.methods.tv import TaskVectors

    lm = tiny(arch)
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    prompts = [encoder.encode(e) for e in sample_episodes(task.splits["validation"], 2, 1, 4, 12, "v")]
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    batch = scorer.batch(prompts)
    tv = TaskVectors()
    tv.theta = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    cached = scorer.last_token_variants(batch, [tv._edit(scorer, l) for l in (0, 1)])
    for layer in (0, 1):
        with scorer.at_last_token(batch, tv._edit(scorer, layer)):
            torch.testing.assert_close(cached[layer], scorer.label_scores(batch), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gemma3", "mistral_sw"])
def test_last_token_search_past_the_sliding_window_equals_full_forwards(arch, task):
    """Prompts longer than the window (8 shots per class here; Gemma 3 on Financial Phrasebank): each
    edit's token is taken back from the growing cache (transformers refused that crop), and every
    edit still scores as a full forward."""
    from ivlib.methods.tv import TaskVectors
    from ivlib.tiny import SLIDING_WINDOW

    lm = tiny(arch)
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    prompts = [encoder.encode(e) for e in sample_episodes(task.splits["validation"], 2, 8, 3, 12, "v")]
    assert min(len(p.ids) for p in prompts) > SLIDING_WINDOW
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    batch = scorer.batch(prompts)
    tv = TaskVectors()
    tv.theta = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    cached = scorer.last_token_variants(batch, [tv._edit(scorer, l) for l in (0, 1, 0)])  # the prefix reused 3 times
    for i, layer in enumerate((0, 1, 0)):
        with scorer.at_last_token(batch, tv._edit(scorer, layer)):
            torch.testing.assert_close(cached[i], scorer.label_scores(batch), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_head_patching_and_function_vectors_work_on_every_family(arch, task):
    from ivlib.methods.fv import FunctionVectors

    lm = tiny(arch)
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    train = sample_episodes(task.splits["train"], 2, 1, 4, 13, "t")
    fv = FunctionVectors(n_top_heads=2, ie_episodes=2)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    fv.fit(scorer, encoder, train)
    assert fv.mean_act.shape == (2, 4, 16) and torch.isfinite(fv.effects).all()
    assert fv.effects.abs().sum() > 0  # patching a head moved the label probability somewhere
    batch = scorer.batch([encoder.encode(e) for e in train])
    assert not torch.allclose(fv.predict(scorer, batch), ICL().predict(scorer, batch), atol=1e-6)


def test_hooks_are_removed_even_when_the_forward_raises():
    lm = tiny("gpt2")
    module = lm.layout.attn_out[0]
    with pytest.raises(IndexError), edit_outputs([module], torch.tensor([0]), torch.tensor([99]), read=True):
        lm.model(input_ids=torch.tensor([[5, 6]]))  # column 99 does not exist: the hook raises
    assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_soft_injection_fits_and_edits_on_every_family(arch, task):
    """SITE differentiates through every family's attention for its mixing weights."""
    from ivlib.methods.site import SoftInjection

    lm = tiny(arch)
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    train = sample_episodes(task.splits["train"], 2, 1, 4, 13, "t")
    site = SoftInjection(site_steps=2, site_batch=2)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    site.fit(scorer, encoder, train, sample_episodes(task.splits["validation"], 2, 1, 4, 13, "v"))
    assert site.emb.shape == (2, 4, 16) and not torch.equal(site.logits, torch.zeros(2, 4))  # a step moved them
    batch = scorer.batch([encoder.encode(e.query_only()) for e in train])
    assert not torch.allclose(site.predict(scorer, batch), ICL().predict(scorer, batch), atol=1e-6)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_head_dim_is_the_width_each_head_has_at_the_output_projection(arch):
    """What state specs check FV's and SITE's per-head tensors against: the projection's real input."""
    lm = tiny(arch)
    seen = []
    handle = lm.layout.attn_out[0].register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[-1]))
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([[5, 6, 7]]))
    finally:
        handle.remove()
    assert lm.layout.head_dim is not None and lm.layout.head_dim * lm.layout.n_heads == seen[0]
