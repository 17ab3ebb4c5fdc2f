"""Shared by the benchmarks: model set-up (registry or random 7B shape) and timing."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ivlib.builtin_tasks import vocabulary  # noqa: E402
from ivlib.config import load_config, lookup  # noqa: E402
from ivlib.layout import discover_layout  # noqa: E402
from ivlib.models import LoadedModel, load_model, resolve_device  # noqa: E402
from ivlib.prompts import PromptEncoder  # noqa: E402
from ivlib.tasks import Task, load_task  # noqa: E402
from ivlib.tiny import build_tokenizer  # noqa: E402

LLAMA7B_SHAPE = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)


def random_llama7b(
    device: torch.device, tokenizer_dir: str | None = None, dtype: torch.dtype = torch.bfloat16, **shape
) -> LoadedModel:
    """Llama-2-7B's shape with random weights (bf16 unless `dtype`), built on `device`.

    Throughput does not depend on weight values.

    Text becomes ids with the tokenizer in `tokenizer_dir` (e.g. SmolLM2's; see `FoldedEncoder`), else
    with ivlib's tiny word-level tokenizer, whose ids are far below 32000. `shape` overrides
    config fields (small shapes let the code path be tried on CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if tokenizer_dir is None:
        tokenizer = build_tokenizer(vocabulary())
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    settings = {**LLAMA7B_SHAPE, **shape}
    vocab = settings["vocab_size"]
    special = {
        k: v
        for k, v in (
            ("bos_token_id", tokenizer.bos_token_id),
            ("eos_token_id", tokenizer.eos_token_id),
            ("pad_token_id", tokenizer.pad_token_id),
        )
        if v is not None and v < vocab
    }
    config = LlamaConfig(max_position_embeddings=4096, **special, **settings)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    name = "random-llama-2-7b" if not shape else "random-llama(" + ",".join(f"{k}={v}" for k, v in shape.items()) + ")"
    return LoadedModel(
        name,
        model,
        tokenizer,
        discover_layout(model),
        device,
        dtype,
        "random" + (f" + tokenizer {tokenizer_dir}" if tokenizer_dir else " + tiny tokenizer"),
        add_bos=tokenizer.bos_token_id is not None,
    )


def model_vocab(lm: LoadedModel) -> int:
    return lm.model.get_input_embeddings().weight.shape[0]


class FoldedEncoder(PromptEncoder):
    """A PromptEncoder whose ids are taken modulo the model's vocabulary.

    Only for random-weight models driven by a larger tokenizer (SmolLM2's 49152 ids into
    Llama-2's 32000): token identity means nothing to random weights, prompt lengths are what
    is measured, and folding keeps every id valid. Label ids must stay distinct after folding.
    """

    def __init__(self, tokenizer, label_words, add_bos, vocab: int, **kwargs):
        super().__init__(tokenizer, label_words, add_bos, **kwargs)
        self.vocab = vocab
        self.bos = [i % vocab for i in self.bos]
        self.label_ids = [i % vocab for i in self.label_ids]
        self.folded = self.total = 0

    def encode(self, episode):
        prompt = super().encode(episode)
        self.total += len(prompt.ids)
        self.folded += sum(i >= self.vocab for i in prompt.ids)
        prompt.ids = [i % self.vocab for i in prompt.ids]
        return prompt


def make_encoder(lm: LoadedModel, task: Task, random_weights: bool) -> PromptEncoder:
    """The task's PromptEncoder; for random weights with a tokenizer larger than the vocab, a folding one."""
    vocab = model_vocab(lm)
    if random_weights and len(lm.tokenizer) > vocab:
        encoder = FoldedEncoder(lm.tokenizer, task.label_words, lm.add_bos, vocab)
    else:
        encoder = PromptEncoder(lm.tokenizer, task.label_words, lm.add_bos)
    encoder.check_label_collisions()
    return encoder


def setup(
    config_file: str | None,
    model: str,
    task: str,
    gpu: int,
    random_7b: bool,
    tokenizer_dir: str | None = None,
    random_dtype: torch.dtype = torch.bfloat16,
) -> tuple[LoadedModel, Task]:
    config = load_config(config_file)
    device = resolve_device(gpu)
    loaded_task = load_task(task, lookup(config.tasks, "task", task))
    if random_7b:
        lm = random_llama7b(device, tokenizer_dir, random_dtype)
    else:
        lm = load_model(model, lookup(config.models, "model", model), device, quiet=True)
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


# ---- shared by bench/limit.py and bench/extraction.py (appended; the functions above are unchanged) ----
def set_threads(ap, threads: int | None) -> None:
    """Apply `--threads`: on a CPU shared with other work, torch's one thread per core oversubscribes it
    and OpenMP's waiting can slow every forward several-fold (see bench/dt.py), so 1 measures the code."""
    if threads is None:
        return
    if threads < 1:
        ap.error("--threads must be >= 1")
    torch.set_num_threads(threads)


def where_it_ran(device: torch.device, load_start: float) -> str:
    """The device in words; on CPU with the thread count and the load average at the start and now."""
    import os

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"CPU, {torch.get_num_threads()} thread(s) of {os.cpu_count()} cores, load average {load_start:.1f} "
        f"at the start, {os.getloadavg()[0]:.1f} at the end"
    )


def status_kib(field: str) -> int:
    """A `/proc/self/status` figure in KiB (VmRSS: resident now; VmHWM: peak since start or last reset)."""
    import re

    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def settle_rss(model: torch.nn.Module) -> int:
    """Page every weight in, collect garbage and trim the C heap; returns VmRSS (KiB).

    A memory-mapped checkpoint is otherwise paged in during the first forward and its weights
    would be charged to whatever runs first; freed load-time heap would hide under the peak.
    """
    import ctypes
    import gc

    with torch.no_grad():
        for param in model.parameters():
            param.sum()
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status_kib("VmRSS")


def reset_peak_rss() -> bool:
    """Lower the kernel's peak-RSS mark (VmHWM) to the current RSS; False where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_children(script: str, argv: list[str], names: list[str], tag: str) -> dict[str, dict]:
    """Run `script argv --_child NAME` once per name, each in a fresh process, and collect the JSON
    line each prints after `tag`: CPU peak memory is per process, so one path per process."""
    import json
    import subprocess

    out = {}
    for name in names:
        proc = subprocess.run([sys.executable, script, *argv, "--_child", name], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(tag)]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"{Path(script).name}: the memory subprocess for '{name}' failed (exit {proc.returncode})")
        out[name] = json.loads(lines[-1].removeprefix(tag))
    return out


def cuda_peaks(device: torch.device, names: list[str], run_one) -> dict[str, dict]:
    """Peak CUDA memory of each path (`run_one(name)`), stats reset in between; `before` is what was
    allocated when the path started (the model), so `peak - before` is the path's own."""
    import gc

    out = {}
    for name in names:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run_one(name)
        torch.cuda.synchronize(device)
        out[name] = {"before": before, "peak": torch.cuda.max_memory_allocated(device)}
    return out
