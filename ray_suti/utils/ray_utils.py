"""Starting or joining Ray the same way from every job."""
from __future__ import annotations

import os

import ray

# One thread per process: on these 2-core machines a 2-thread torch process stalls in libgomp
# barriers, and two 1-thread workers use both cores (docs/NOTES.md, "Machine").
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``) or start an embedded one.

    The thread settings go into this process's environment, which an embedded Ray's workers
    inherit; on a cluster Ray gives each task and actor floor(num_cpus) OpenMP threads (at least
    one). No job-level runtime_env: with one, no prestarted worker fits the job, so every task and
    actor waits for a new worker process, and a job submitted with its own runtime_env would clash."""
    if ray.is_initialized():
        return
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    kwargs = {"log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs.update(num_cpus=num_cpus)
    ray.init(**kwargs)


def pool_actor_cpus(pool_size: int) -> float:
    """CPUs for each actor of a Ray Data pool: one, unless the pool would take every CPU of the
    cluster and leave none for the read's file listing (ListFiles asks a whole CPU): a deadlock with
    2 actors on 2 CPUs. Then the CPUs but one, shared."""
    total = ray.cluster_resources().get("CPU", 1.0)
    return min(1.0, max(total - 1.0, 0.25 * pool_size) / pool_size)


def run_sharded(fn, args_per_shard: list[tuple], max_in_flight: int, desc: str, unit_key: str | None = None,
                total: int | None = None, progress: bool = True, num_gpus: float = 0) -> list:
    """Runs ``fn(*args)`` as Ray tasks (1 CPU and ``num_gpus`` each), at most ``max_in_flight`` at once
    so memory stays bounded, with a progress bar; returns the results in shard order."""
    import ray

    from .progress import bar as progress_bar

    init_ray()
    task = ray.remote(num_cpus=1, num_gpus=num_gpus)(fn)
    results: dict = {}
    pending: dict = {}
    queue = list(enumerate(args_per_shard))
    with progress_bar(total=total or len(queue), desc=desc, unit=unit_key or "shard", disable=not progress) as bar:
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                i, args = queue.pop(0)
                pending[task.remote(*args)] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            results[i] = ray.get(done[0])
            bar.update(results[i][unit_key] if unit_key else 1)
    return [results[i] for i in range(len(args_per_shard))]
