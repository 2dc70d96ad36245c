"""How many CPU threads a command uses: the CPUs that are free when it starts, not all of them.

Beside a busy single-threaded job, torch's default of one OpenMP thread per CPU runs many times
slower than one thread: every parallel region (each conv, each matmul) waits for the thread
sharing the busy core (bench/results/busy_core_2026-12-01.md). So each command-line entry
point calls `use_free_cpus()` once, before any work.
"""
from __future__ import annotations

import os
import sys
import time

SAMPLE_S = 0.2  # long enough for ~20 scheduler ticks per CPU, short beside any command
SAMPLES = 3     # back to back; the least busy one counts


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """{cpu: (busy ticks, total ticks)} from /proc/stat for the given CPUs."""
    times = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            ticks = [int(x) for x in fields[:8]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            times[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return times


def busy_cpus(cpus: set[int], sample_s: float = SAMPLE_S) -> float:
    """How many of `cpus` other processes kept busy over `sample_s` seconds (0 .. len(cpus));
    0 where /proc/stat cannot be read. This process sleeps meanwhile, so it is not counted."""
    try:
        before = _cpu_times(cpus)
        time.sleep(sample_s)
        after = _cpu_times(cpus)
    except (OSError, ValueError):
        return 0.0
    busy = 0.0
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (b1, t1))
        busy += (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    return busy


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's share)."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def free_cpus(sample_s: float = SAMPLE_S) -> int:
    """The CPUs this process may run on (its affinity mask) that are idle now, at least 1. Other
    processes take the CPUs they kept busy, rounded, in the least busy of SAMPLES samples: a
    busy loop is busy in all of them, a blip (a process starting or exiting) fills one at most."""
    cpus = usable_cpus()
    taken = len(cpus)
    for _ in range(SAMPLES):  # stop at a sample with nothing taken: the least can't go lower
        taken = min(taken, int(busy_cpus(cpus, sample_s) + 0.5))
        if taken == 0:
            break
    return max(1, len(cpus) - taken)


def use_free_cpus(sample_s: float = SAMPLE_S) -> int:
    """Set torch's intra-op threads to free_cpus() unless the user set OMP_NUM_THREADS; returns
    the thread count torch now uses. Call once per process, before the first torch op; says so
    on stderr when other processes' load made it use fewer threads than CPUs."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        free, cpus = free_cpus(sample_s), torch.get_num_threads()
        if free < cpus:
            print(f"tti.infra.threads: {cpus - free} of {cpus} CPUs busy with other processes: using "
                  f"{free} thread(s) (set OMP_NUM_THREADS to choose)", file=sys.stderr)
        torch.set_num_threads(free)
    return torch.get_num_threads()
