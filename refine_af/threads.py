"""torch's CPU threads sized to the cores a step really gets.

torch starts one thread per core of the host, blind to a container's CPU quota and to
sibling steps on the same machine. Two instance shards that each take both cores of a
2-core laptop spend their time fighting over them; a pod limited to 8 CPUs on a 64-core
node runs 64 threads on 8 CPUs' worth of time. A step therefore asks for its share.

Waiting threads sleep rather than spin: ``refine_af`` sets ``OMP_WAIT_POLICY=PASSIVE``
before torch loads (``refine_af/__init__.py``). Measured with the bundled model on 2 cores
at load 11-13: 2.2-7.2 s per decoding step with spinning waits, 0.17 s with passive ones
(one thread: 0.16-0.24 s).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

# Set by the local runner: how many instance shards its ParallelFor runs side by side on
# this host; on a cluster each shard is a pod of its own.
PARALLEL_SHARDS_ENV = "REFINE_AF_PARALLEL_SHARDS"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores() -> int:
    """Cores this process may run on, capped by the cgroup (v2) CPU quota."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def parallel_shards() -> int:
    return max(1, int(os.environ.get(PARALLEL_SHARDS_ENV) or 1))


def use_share_of_cores(siblings: int = 1) -> int:
    """Set torch's intra-op threads to this step's share of the cores; returns the count.

    ``siblings`` is how many steps share the host, this one included. An explicit
    ``OMP_NUM_THREADS`` wins: whoever set it knows better.
    """
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, available_cores() // max(1, siblings))
    torch.set_num_threads(threads)
    return threads
