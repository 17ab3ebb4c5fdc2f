"""A tiny byte-level BPE tokenizer and model, trained here in a second (no download).

The tiny models' own tokenizer makes a space a token of its own; real BPE tokenizers (GPT-2,
Llama 3, SmolLM2) write a word with its leading space (' positive'). Templates whose delimiter
ends in a space (DT's 'Sentiment:' + ' positive') are cut differently under each, so the template
tests run both.
"""

from __future__ import annotations

from functools import cache

import torch

from ivlib.builtin_tasks import vocabulary
from ivlib.layout import discover_layout
from ivlib.models import LoadedModel
from ivlib.templates import BUILTIN

SPECIALS = ["[PAD]", "[BOS]", "[UNK]"]


def _corpus() -> list[str]:
    """Texts whose frequent pieces become merges: the built-in task's words, the templates' words,
    and label words after a space (so ' good', ' positive' are single tokens, as in GPT-2)."""
    words = sorted(vocabulary())
    labels = ["good", "bad", "positive", "negative", "neutral", "great", "terrible", "World", "Sports"]
    templates = [t.context("x") for t in BUILTIN.values()]
    return [" ".join(words)] * 3 + [" " + " ".join(labels)] * 50 + templates * 20


@cache
def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", pad_token="[PAD]", unk_token="[UNK]")


def bpe_model(seed: int = 0) -> LoadedModel:
    """A tiny GPT-2 over the BPE tokenizer, wrapped as ivlib wraps a model."""
    from transformers import AutoModelForCausalLM

    from ivlib.tiny import tiny_config

    tok = bpe_tokenizer()
    config = tiny_config("gpt2", len(tok))
    config.bos_token_id = config.eos_token_id = tok.bos_token_id
    config.pad_token_id = tok.pad_token_id
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.random.set_rng_state(state)
    return LoadedModel("tiny-bpe", model, tok, discover_layout(model), torch.device("cpu"), torch.float32, "test", True)
