"""How many CPU threads torch may use in this run (`--threads N`).

torch starts one intra-op thread per core. On a machine shared with other jobs that oversubscribes
the cores, and OpenMP's busy-waiting threads slow every forward several-fold (ICL on SmolLM2 on 2
cores: 28.5 episodes/s alone, 3.5 beside another 2-thread torch job, 14.4 with one thread each).
Under a batch scheduler the right number is what the job was given (SLURM's `--cpus-per-task`).
Not set, torch's own default stands and the record says nothing, as before the setting existed.
"""

from __future__ import annotations

import contextlib

import torch

from .settings import Setting

THREADS = Setting(
    "threads",
    int,
    None,
    "torch CPU threads for this run (intra-op, and at most as many inter-op); on a shared machine or under "
    "SLURM give the cores the job has (--cpus-per-task), e.g. 1 beside other jobs; recorded when given "
    "(default: torch's own, one per core)",
    low=1,
    optional=True,
)


def use_threads(n: int | None) -> int | None:
    """Check `n` as the flag is checked and apply it to this process; None leaves torch's default."""
    n = THREADS.check(n)
    if n is None:
        return None
    torch.set_num_threads(n)
    # the inter-op pool (idle in eager forwards) can be sized once per process, before it is used: a
    # second run in the same process keeps the first one's
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)
    return n
