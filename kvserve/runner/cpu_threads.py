"""How many CPU threads a CPU engine computes on, for PyTorch and kvserve's C kernels alike.

PyTorch's CPU wheels and the C kernels (`kernels/cpu_quant*.py`, built with `-fopenmp`) share one
OpenMP runtime (`libgomp.so.1`, loaded once by PyTorch), and the C kernels run on
`omp_get_max_threads()` of the calling thread, so `torch.set_num_threads(n)` sets both.

The default leaves busy cores alone. OpenMP's threads spin at every barrier (a decoder layer
has several per token), so a thread that shares its core with another busy process stalls all
the others: on the 2-core reference machine with other work running (load average 3.4 to 7),
batch-1 decode of the built-in model ran at 4 to 14 tok/s on 2 threads and at 30 to 100 tok/s
on 1 (benchmarks/RESULTS.md, "Threads under load"). So the default is the usable cores minus the
cores other processes are busy on right now, at least 1: every core on an idle machine, fewer on
a busy one. "Right now" is the kernel's count of runnable tasks (`procs_running` in /proc/stat,
less this process, the median of three samples over ~10 ms), not the 1-minute load average: that
one still counts a run that ended a minute ago (the previous `kvserve generate`, a test suite),
and would halve the threads of the next command on an idle 2-core machine. Without /proc, the
load average stands in.
`OMP_NUM_THREADS`, or a count the program already set with `torch.set_num_threads` below the
CPU count, wins over that guess (the user's explicit choice); `threads=` over all of them.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under `taskset` or a container)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not POSIX
        return None


def running_tasks(stat_path: str = "/proc/stat") -> int | None:
    """Runnable tasks on the whole machine now (`procs_running`), or None without /proc/stat."""
    try:
        with open(stat_path) as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def busy_cpus(samples: int = 3, interval: float = 0.005) -> float:
    """CPUs other processes keep busy now: the median of `samples` counts of runnable tasks less
    this process's running thread; the 1-minute load average where /proc is missing."""
    import statistics
    import time

    counts = []
    for i in range(samples):
        n = running_tasks()
        if n is None:
            break
        counts.append(max(n - 1, 0))
        if i + 1 < samples:
            time.sleep(interval)
    if counts:
        return float(statistics.median(counts))
    return load_average() or 0.0


def default_threads(ranks: int = 1) -> int:
    """Threads per process when none are asked for: `OMP_NUM_THREADS` if set; PyTorch's count if
    the program already lowered it (`torch.set_num_threads`); else the usable CPUs not already
    busy (`busy_cpus`), shared among `ranks` processes; at least 1."""
    import torch

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = usable_cpus()
    if torch.get_num_threads() < cpus:
        return torch.get_num_threads()
    free = cpus - int(busy_cpus() + 0.5)
    return max(1, min(cpus, free) // max(1, ranks))


def set_threads(threads: int | None, ranks: int = 1) -> int:
    """Apply `threads` (None: `default_threads`) to this thread's PyTorch / OpenMP; returns it.

    OpenMP's thread count belongs to the calling thread, so the engine calls this on the thread
    that runs its steps (the server's engine thread builds the engine there too)."""
    import torch

    n = default_threads(ranks) if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be an integer >= 1 (got {threads!r})")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    logger.info(
        "CPU threads: %d of %d usable CPUs%s", n, usable_cpus(),
        "" if threads is not None else f" (default; {busy_cpus():.0f} CPUs busy with other work)",
    )
    return n
