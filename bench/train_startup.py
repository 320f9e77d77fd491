"""Where a short Ray Train run's wall time goes: a timeline of its Ray tasks and actor calls.

    python bench/train_startup.py [--workers 1] [--steps 2] [--out runs/train-startup.json]

One short SuTI run (tiny-32, oracle examples, batch 4) on an embedded Ray with a dashboard (the
state API needs it), then every task and actor method call of the run from Ray's state API, in
seconds from the ``run_training`` call: when the controller, the workers and Ray Data's actors
started, when the workers' train function began, when the first batch came (the split
coordinator's first ``get`` returning) and when the run ended. Prints the milestones and the
timeline; writes both as JSON.
"""
import argparse
import json
import os
import tempfile
import time

MILESTONES = {  # name -> (task name, "start" or "end"): the first such event
    "controller starts": ("TrainController.__init__", "start"),
    "workers start": ("RayTrainWorker.__init__", "start"),
    "train function starts": ("RayTrainWorker.run_train_fn", "start"),
    "dataset shard asked for": ("DatasetManager.get_dataset_shard", "start"),
    "split coordinator starts": ("SplitCoordinator.__init__", "start"),
    "first batch ready": ("SplitCoordinator.get", "end"),
    "first report": ("SynchronizationActor.broadcast_from_rank_zero", "end"),
}
NOISE = ("poll_status", "get_reserved_resources", "update_", "request_resources")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default="runs/train-startup.json")
    args = parser.parse_args()

    from ray.util.state import list_tasks

    from ray_suti.train.config import TrainConfig
    from ray_suti.train.trainer import run_training
    from ray_suti.utils.ray_utils import init_ray
    from ray_suti.world.oracle import OracleConfig, write_oracle

    init_ray(num_cpus=2, dashboard=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_oracle(OracleConfig(out=f"{tmp}/oracle", examples=8, examples_per_shard=4), progress=False)
        cfg = TrainConfig(data=f"{tmp}/oracle", steps=args.steps, batch_size=4, noise_repeats=1,
                          num_workers=args.workers, cpus_per_worker=0.5, checkpoint_every=args.steps, report_every=1,
                          probe_every=0, storage_path=f"{tmp}/runs", name="startup")
        start = time.time()
        run_training(cfg)
        seconds = round(time.time() - start, 1)

    events = []
    for task in list_tasks(detail=True, limit=10000, raise_on_missing_output=False):
        begin, end = task.get("start_time_ms"), task.get("end_time_ms")
        if begin and begin / 1000 >= start and not any(n in task["name"] for n in NOISE):
            events.append({"name": task["name"], "start": round(begin / 1000 - start, 1),
                           "end": round(end / 1000 - start, 1) if end else None})
    events.sort(key=lambda e: e["start"])
    milestones = {}
    for label, (name, edge) in MILESTONES.items():
        times = [e[edge] for e in events if e["name"] == name and e[edge] is not None]
        milestones[label] = min(times) if times else None
    milestones["run_training returns"] = seconds
    for label, t in milestones.items():
        print(f"{t if t is not None else '-':>6} s  {label}")
    for e in events:
        print(f"  {e['start']:6.1f} -> {e['end'] if e['end'] is not None else '?':>6}  {e['name']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"workers": args.workers, "steps": args.steps, "milestones": milestones, "events": events}, f,
                  indent=1)


if __name__ == "__main__":
    main()
