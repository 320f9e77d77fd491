"""Starting or joining Ray the same way from every job."""
from __future__ import annotations

import os

import ray

# One thread per process: on these 2-core machines a 2-thread torch process stalls in libgomp
# barriers, and two 1-thread workers use both cores (see README, "Threads").
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``) or start an embedded one."""
    if ray.is_initialized():
        return
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    kwargs = {"runtime_env": {"env_vars": dict(WORKER_ENV)}, "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    ray.init(**kwargs)
