"""How big a training job can be on what the cluster has free: one rule for the fine-tuning queue and for `training.finetune`.

Serving holds its CPUs first; a job takes what is left, less Ray Data's share for reading and
encoding the dataset: as many workers as fit at `cpus_per_worker` (up to `max_workers`), or one
smaller worker down to `min_cpus_per_worker`, or nothing (it waits).
"""

from __future__ import annotations

import math

DATA_CPUS = 0.2  # Ray Data reads and encodes the dataset beside the workers


def sizing(free_cpus: float, max_workers: int, cpus_per_worker: float, min_cpus_per_worker: float) -> tuple[int, float] | None:
    """(workers, CPUs each) for a job on `free_cpus`; None when even one worker does not fit."""
    usable = free_cpus - DATA_CPUS
    if usable < min_cpus_per_worker - 1e-9:
        return None
    workers = max(1, min(max_workers, math.floor(usable / cpus_per_worker + 1e-9)))
    return workers, round(min(cpus_per_worker, usable / workers), 2)
