"""How many cores this process may use, and how many frontend processes `--http-workers` makes of
them (pure sizing, and the reading of the affinity mask and the cgroup's CPU quota)."""

from __future__ import annotations

import os


def process_count(value: int | str, cores: int, engines: int = 0) -> int:
    """Frontend processes for `--http-workers` (`auto`: one per 4 cores, at most 4; one below 8;
    never more than the cores left once each local engine has two).

    Why these numbers: on a 16-core GPU host one process saturates a core near 256 concurrent
    streams of a small model, and four brought first-token latency to a third of vLLM's own
    server's (docs/benchmarks.md); an engine's core loop and its worker's output handling each
    keep a core busy, and below 8 cores the engines need what is left."""
    if value != "auto":
        return int(value)
    if cores < 8:
        return 1
    return max(1, min(4, cores // 4, cores - 2 * engines))


def quota_cores(cpu_max: str | None, quota_us: str | None = None, period_us: str | None = None) -> int | None:
    """Whole cores a cgroup's CPU quota allows (v2 `cpu.max`, or v1's quota and period files);
    None when there is no quota. A container limited to 2 CPUs on a 64-core node still sees 64
    in its affinity mask: the quota is what it may use."""
    try:
        if cpu_max is not None:
            quota, period = (cpu_max.split() + ["100000"])[:2]  # "max 100000" or "200000 100000"
            if quota == "max":
                return None
            return max(1, int(quota) // int(period))
        if quota_us is not None and period_us is not None and int(quota_us) > 0:
            return max(1, int(quota_us) // int(period_us))
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def usable_cores() -> int:
    try:
        cores = len(os.sched_getaffinity(0))  # the cpuset a container or taskset gives
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = quota_cores(
        _read("/sys/fs/cgroup/cpu.max"),
        _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
        _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    )
    return min(cores, quota) if quota else cores
