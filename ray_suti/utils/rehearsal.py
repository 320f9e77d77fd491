"""Multi-node rehearsal on one machine: a head and a worker node (`ray start` on 127.0.0.1, each with
its own resources), then the real jobs submitted to the head as a user would (`ray job submit`):
world -> build_dataset (2 CLIP actors) -> pretraining with 2 Ray Train workers placed STRICT_SPREAD
(one per node, DeepSpeed ZeRO-2 over gloo). Ray's state API says which job and node ran each task
and actor, so the result shows that every stage used both nodes."""
from __future__ import annotations

import os
import sys
import time
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _wait(client, job: str, entrypoint: str, timeout_s: float) -> dict:
    """Waits for a submitted job; -> its status, seconds and Ray job id. Raises with the job's log
    tail on failure."""
    from ray.job_submission import JobStatus

    start = time.time()
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() - start > timeout_s:
            client.stop_job(job)
            raise TimeoutError(f"job {entrypoint!r} ran over {timeout_s} s")
        time.sleep(0.5)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {entrypoint!r} {status}:\n{client.get_job_logs(job)[-3000:]}")
    info = client.get_job_info(job)
    return {"status": str(status), "seconds": round((info.end_time - info.start_time) / 1000, 1), "job_id": info.job_id}


def _work_by_job_and_node(dashboard: str) -> Counter:
    """Tasks and actors counted per (Ray job id, node id)."""
    from ray.util.state import list_actors, list_tasks

    counts = Counter()
    for items in (list_tasks(address=dashboard, limit=10000, raise_on_missing_output=False),
                  list_actors(address=dashboard, limit=10000, raise_on_missing_output=False)):
        for item in items:
            if item.node_id:
                counts[item.job_id, item.node_id] += 1
    return counts


def rehearse(out: str, pages: int = 40, train_steps: int = 4, cpus_per_node: int = 2, timeout_s: float = 900) -> dict:
    """Starts the two-node cluster, runs the stages as jobs, stops it; ``timeout_s`` for the cluster
    to come up and for each job. Paths go to the jobs as ``file://`` URIs, as on a cluster with
    object storage and no shared file system."""
    from pathlib import Path

    from ray.job_submission import JobSubmissionClient

    from .local_cluster import LocalCluster

    out = os.path.abspath(out)
    uri = Path(out).as_uri()
    py = sys.executable
    stages = {
        "world": f"{py} {REPO}/jobs/make_world.py --out {out}/world --pages {pages} --image-size 32 "
                 f"--pages-per-shard {max(1, pages // 4)} --preview-pages 0",
        "build_dataset": f"{py} {REPO}/jobs/build_dataset.py --input {uri}/world/web --output {uri}/clusters "
                         f"--embed-concurrency 2 --clip-pretrained {REPO}/checkpoints/tiny-clip.safetensors",
        "train": f"{py} {REPO}/jobs/pretrain.py --data {uri}/world/web --num-workers 2 "
                 f"--placement-strategy STRICT_SPREAD --zero-stage 2 --steps {train_steps} --batch-size 4 "
                 f"--checkpoint-every {train_steps} --report-every 1 --storage-path {uri}/train --name rehearsal "
                 f"--export-file {uri}/model.safetensors --export {uri}/model",
    }
    with LocalCluster(head_cpus=cpus_per_node, timeout_s=timeout_s) as cluster:
        cluster.add_worker(cpus=cpus_per_node, timeout_s=timeout_s)
        nodes = cluster.alive_nodes()
        head_id = next(n.node_id for n in nodes if n.is_head_node)
        names = {n.node_id: "head" if n.node_id == head_id else "worker" for n in nodes}
        client = JobSubmissionClient(cluster.dashboard)
        result = {"nodes": {names[n.node_id]: int(n.resources_total.get("CPU", 0)) for n in nodes}, "stages": {}}
        for stage, entrypoint in stages.items():  # one at a time: side by side, the build's CLIP actors
            # and the trainers held all 4 CPUs and both jobs' reads waited for one (found stalled)
            result["stages"][stage] = _wait(client, client.submit_job(entrypoint=entrypoint), entrypoint, timeout_s)
        counts = _work_by_job_and_node(cluster.dashboard)
        for info in result["stages"].values():
            info["tasks_and_actors_per_node"] = {names.get(node, node): n for (job_id, node), n in counts.items()
                                                 if job_id == info["job_id"]}
    return result


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/rehearsal")
    parser.add_argument("--pages", type=int, default=40)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args()
    result = rehearse(args.out, args.pages, args.train_steps)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
