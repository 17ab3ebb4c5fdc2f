"""Shared by the benchmarks: model set-up (registry or random 7B shape) and timing."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ivlib.config import load_config, lookup  # noqa: E402
from ivlib.layout import discover_layout  # noqa: E402
from ivlib.models import LoadedModel, load_model, resolve_device  # noqa: E402
from ivlib.tasks import Task, load_task  # noqa: E402
from ivlib.tiny import build_tokenizer  # noqa: E402


def random_llama7b(device: torch.device) -> LoadedModel:
    """Llama-2-7B's shape with random bf16 weights: throughput does not depend on weight values."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                         bos_token_id=2, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    tokenizer = build_tokenizer()  # ids are far below 32000
    return LoadedModel("random-llama-2-7b", model, tokenizer, discover_layout(model), device, torch.bfloat16,
                       "random", add_bos=True)


def setup(config_file: str | None, model: str, task: str, gpu: int, random_7b: bool) -> tuple[LoadedModel, Task]:
    config = load_config(config_file)
    device = resolve_device(gpu)
    loaded_task = load_task(task, lookup(config.tasks, "task", task))
    lm = random_llama7b(device) if random_7b else load_model(model, lookup(config.models, "model", model), device,
                                                              quiet=True)
    return lm, loaded_task


def add_common_args(ap) -> None:
    ap.add_argument("-c", "--config")
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-t", "--task", default="review_sentiment")
    ap.add_argument("-g", "--gpu", type=int, default=-1)
    ap.add_argument("--random-llama7b", action="store_true", help="Llama-2-7B shape, random bf16 weights (GPU)")
    ap.add_argument("--quick", action="store_true", help="a small run that ends in a few minutes on CPU")


def timed(fn, device: torch.device):
    """(result, seconds), with the GPU drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start
