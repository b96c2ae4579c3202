"""How many CPU threads torch uses: the cores that are free, not every core of the machine.

torch starts one thread per core. When another job already keeps cores busy, those threads
wait on each other at every operation, and a CPU run got 5-9x slower than with one thread. The
CLI therefore takes the cores this process may run on, subtracts what other jobs keep busy
(the 1-minute load average, taken before this run starts working) and splits the rest between
the processes of a multi-process CPU run. ``--threads N`` (or ``OMP_NUM_THREADS``) overrides it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else max(1, cores)


def _cgroup_quota() -> float | None:
    """The CPU quota of cgroup v2 (``cpu.max``) in cores; None without a quota."""
    try:
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) / int(period)


def choose_num_threads(*, cores: int, load_average: float, processes: int = 1) -> int:
    """Threads per process: the cores other jobs leave free, shared by ``processes``.

    Args:
        cores: cores this process may run on (``available_cores()``).
        load_average: runnable processes of other jobs (the 1-minute load average before this
            run starts working).
        processes: processes of this run on the machine (a CPU DDP run's devices per node).

    Returns:
        At least 1, at most ``cores // processes``; busy cores are rounded to the nearest one.
    """
    if cores < 1 or processes < 1:
        raise ValueError(f"cores={cores} and processes={processes} must be >= 1")
    free = cores - math.floor(max(0.0, load_average) + 0.5)
    return max(1, min(cores // processes, free // processes))


def set_torch_threads(threads: int | None, *, processes: int = 1) -> str | None:
    """Set torch's thread count: ``threads``, else ``OMP_NUM_THREADS``, else the free cores.

    Returns:
        A line saying what was chosen when it is fewer than the cores (None otherwise).

    Raises:
        ValueError: ``threads`` below 1.
    """
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads} must be >= 1 (or null: the free cores)")
        torch.set_num_threads(threads)
        return None
    if os.environ.get("OMP_NUM_THREADS"):  # the user's choice; torch has read it already
        return None
    cores = available_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    chosen = choose_num_threads(cores=cores, load_average=load, processes=processes)
    torch.set_num_threads(chosen)
    if chosen * processes >= cores:
        return None
    return (
        f"lit_dp: {chosen} CPU thread(s) per process ({cores} cores, load average {load:.1f} "
        "from other jobs); --threads N sets the count"
    )
