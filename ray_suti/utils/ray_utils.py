"""Starting or joining Ray the same way from every job."""
from __future__ import annotations

import os

import ray

# One thread per process: on these 2-core machines a 2-thread torch process stalls in libgomp
# barriers, and two 1-thread workers use both cores (docs/NOTES.md, "Machine").
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# Ray kills a worker idle for 1 s beyond one per CPU, so the next task or stage pays for a new
# process (~2 s of CPU: Python, Ray, then the task's imports); an embedded Ray keeps them 20 s.
EMBEDDED_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 20_000}
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def init_ray(num_cpus: int | None = None, dashboard: bool = True) -> None:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``) or start an embedded one.

    The thread settings go into this process's environment, which an embedded Ray's workers
    inherit; on a cluster Ray gives each task and actor floor(num_cpus) OpenMP threads (at least
    one). No job-level runtime_env: with one, no prestarted worker fits the job, so every task and
    actor waits for a new worker process, and a job submitted with its own runtime_env would clash.
    An embedded Ray (one machine) keeps idle workers for reuse (``EMBEDDED_SYSTEM_CONFIG``) and runs
    no preemption watcher beside a Ray Train run: nothing preempts one machine."""
    if ray.is_initialized():
        return
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    from ray._private.services import canonicalize_bootstrap_address  # Ray's own answer: join or start

    kwargs = {"log_to_driver": True}
    address = os.environ.get("RAY_ADDRESS", "")
    # No address joins the cluster `ray start` left on this machine, if any; "local" always starts one.
    if address == "local" or canonicalize_bootstrap_address(address or None) is None:  # a new Ray, ours
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # read by Train's controller, a worker
        kwargs.update(num_cpus=num_cpus, _system_config=EMBEDDED_SYSTEM_CONFIG,
                      include_dashboard=None if dashboard else False)
    ray.init(**kwargs)


def read_parquet(paths, **kwargs):
    """``ray.data.read_parquet`` with its pool of footer-reading actors sized to the cluster.

    Ray Data plans every Parquet read with 32 actors (a process each) that read the files'
    footers, whatever the number of files: sized for wide clusters over object stores, it is
    dozens of processes per read on a small one. Here one per cluster CPU, at most Ray's 32; a
    user's own ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` wins. Ray reads it when the read is planned,
    in this process."""
    import ray.data

    if FOOTER_ACTORS_ENV in os.environ:
        return ray.data.read_parquet(paths, **kwargs)
    init_ray()
    os.environ[FOOTER_ACTORS_ENV] = str(max(1, min(32, int(ray.cluster_resources().get("CPU", 1)))))
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        del os.environ[FOOTER_ACTORS_ENV]


def fit(trainer):
    """``trainer.fit()``, then the SIGINT handler as it was before. Ray Train's handler (set from the
    main thread) holds the run's controller actor, so the controller and its dataset actors (each
    polling) would outlive the run until the next ``fit`` replaced it: in a long-lived process (a
    notebook, a service, the test session) the last run's actors would live on."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    finally:
        if main:
            signal.signal(signal.SIGINT, handler)


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
