"""Tiny randomly initialised models and their tokenizer, built from configs (no download).

They exist for tests and the offline smoke run: every architecture ivlib supports can be built
in a second, deterministically, and exercised through the same code as a real checkpoint.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[BOS]"]
CONTEXT = 1024  # whitespace is a token here, so prompts run about twice as long as with BPE
SLIDING_WINDOW = 256  # the sliding-window models' window: review_sentiment fits it twice at 2 shots, not at 4
# label words of the registry's tasks, so tiny models can run them on local fixture data
# without the character fallback making labels collide (Sports / Sci/Tech)
LABEL_WORDS = [
    "World",
    "Sports",
    "Business",
    "Sci",
    "Tech",
    "negative",
    "positive",
    "neutral",
    "terrible",
    "great",
    "neg",
    "pos",
    "Abbreviation",
    "Entity",
    "Description",
    "Person",
    "Location",
    "Number",
]


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Word-level tokens for `words` (and the registry's label words), falling back to characters for
    any other ASCII word.

    The words come from the caller (the registry passes the built-in tasks' `vocabulary()`), so this
    module depends on no task: a tokenizer is made from a word list, whoever owns it. Whitespace
    characters are tokens of their own, as separators are in real tokenizers.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation) + [" ", "\n", "\t"]
    words = sorted(set(words) | set(LABEL_WORDS))
    pieces = SPECIALS + chars + ["##" + c for c in string.ascii_letters + string.digits] + words
    vocab: dict[str, int] = {}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    model = models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=64)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|[A-Za-z0-9]+|[^\sA-Za-z0-9]"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("##", ""), decoders.Fuse()])  # tokens are exact spans
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", pad_token="[PAD]", unk_token="[UNK]")


def tiny_config(arch: str, vocab_size: int) -> PretrainedConfig:
    """A 2-layer, 64-wide config of the named architecture family."""
    import transformers as tf

    common: dict[str, Any] = dict(vocab_size=vocab_size, bos_token_id=2, eos_token_id=2, pad_token_id=0)
    llama_like: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        **common,
    )
    configs: dict[str, Callable[[], PretrainedConfig]] = {
        "gpt2": lambda: tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=CONTEXT, **common),
        "gptj": lambda: tf.GPTJConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=CONTEXT, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT,
            **common,
        ),
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "mistral": lambda: tf.MistralConfig(**llama_like),
        "gemma": lambda: tf.GemmaConfig(head_dim=16, **llama_like),
        # sliding-window attention: Gemma 3's mix (a sliding layer, then a full one) and Mistral's
        # all-sliding form, windows shorter than the context as in the real models
        "gemma3": lambda: tf.Gemma3TextConfig(
            head_dim=16,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            **llama_like,
        ),
        "mistral_sw": lambda: tf.MistralConfig(sliding_window=SLIDING_WINDOW, **llama_like),
        "opt": lambda: tf.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=CONTEXT,
            **common,
        ),
    }
    if arch not in configs:
        raise KeyError(arch)
    return configs[arch]()


TINY_ARCHS = ("gpt2", "gptj", "gpt_neox", "llama", "qwen2", "mistral", "gemma", "opt", "gemma3", "mistral_sw")


def build_tiny(arch: str, words: Iterable[str], seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """(model, tokenizer), with weights fixed by `seed` so runs are reproducible; `words` are the
    tokenizer's whole words (see `build_tokenizer`), and fix the vocabulary size, hence the weights."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(words)
    config = tiny_config(arch, len(tokenizer))
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval(), tokenizer
