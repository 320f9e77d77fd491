"""Load and faults on the Serve app, 127.0.0.1 only, bounded in requests and time.

    .venv/bin/python bench/serve_load.py [--requests 96 --clients 16 --steps 25 --rounds 2]

In one run, on one local Ray (2 CPUs here):
1. throughput, p50/p95/p99 latency, the largest and the mean batch (goal: max_batch_size, 8) with 16
   clients a replica: 1 replica with batching, 1 replica without, 2 replicas with (goal >= 1.8x of
   1), 1 and 2 replicas alternating for ``--rounds``; with the share of the wall each replica spent
   denoising, the seconds of denoising an image and the CPU seconds per request by kind of process
   (where a shortfall from 2x comes from);
2. overload: 1 replica queueing 4 requests, 32 clients: the share answered 503 (with Retry-After)
   and the count of any other 5xx (goal: none);
3. autoscaling: min 1 / max 2 replicas, load until a second replica is up, then idle until it goes;
4. faults: 2 replicas under load, one replica process killed; the share of requests that still
   succeed (goal >= 99%) and whether Serve replaces the replica.
Prints JSON (and writes it to --out) with the ratios side by side.
"""
import argparse
import base64
import json
import os
import tempfile
import threading
import time

import numpy as np
import requests

from ray_suti.serving.app import build_app
from ray_suti.utils.ray_utils import init_ray
from ray_suti.world import Subject, heldout_seeds, render
from ray_suti.world.contexts import Context
from ray_suti.utils.images import encode_png
from cpu_by_process import snapshot  # bench/, beside this file


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Load:
    """``clients`` threads sending generate requests until ``total`` are sent or ``stop`` is set."""

    def __init__(self, url: str, subjects: list[str], clients: int, total: int, steps: int, deadline_s: float):
        self.url, self.subjects, self.steps = url, subjects, steps
        self.total, self.deadline = total, time.time() + deadline_s
        self.latencies, self.codes, self.sent, self.lock, self.stop = [], [], 0, threading.Lock(), threading.Event()
        self.batch_rows, self.retry_after, self.sampling_share = [], [], []
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(clients)]

    def client(self, i: int) -> None:
        while not self.stop.is_set() and time.time() < self.deadline:
            with self.lock:
                if self.sent >= self.total:
                    return
                n = self.sent
                self.sent += 1
            body = {"prompt": "a photo on the beach", "subject_id": self.subjects[n % len(self.subjects)],
                    "steps": self.steps, "seed": n}
            t0 = time.perf_counter()
            rows = retry = timings = None
            try:
                r = requests.post(f"{self.url}/v1/generate", json=body, timeout=120)
                code = r.status_code
                timings = r.json()["timings"] if code == 200 else None
                rows = timings and timings["batch_rows"]
                retry = r.headers.get("Retry-After") if code == 503 else None
            except requests.RequestException:
                code = 0
            with self.lock:
                self.latencies.append(time.perf_counter() - t0)
                self.codes.append(code)
                self.batch_rows += [rows] if rows else []
                # a batch's sampling seconds shared by its rows: summed, the replicas' time spent denoising
                self.sampling_share += [timings["sampling_s"] / rows] if timings else []
                self.retry_after += [retry] if code == 503 else []

    def run(self, block: bool = True) -> "Load":
        self.t0 = time.perf_counter()
        for t in self.threads:
            t.start()
        if block:
            self.join()
        return self

    def join(self) -> None:
        for t in self.threads:
            t.join()
        self.wall = time.perf_counter() - self.t0

    def summary(self, replicas: int = 1) -> dict:
        lat = np.array(self.latencies) * 1000
        ok = sum(c == 200 for c in self.codes)
        return {"requests": len(self.codes), "ok_rate": round(ok / max(1, len(self.codes)), 4),
                "throughput_rps": round(ok / self.wall, 3), "largest_batch": max(self.batch_rows, default=0),
                "mean_batch": round(float(np.mean(self.batch_rows)), 2) if self.batch_rows else None,
                "busy_503_rate": round(sum(c == 503 for c in self.codes) / max(1, len(self.codes)), 4),
                "busy_with_retry_after": all(r and r.isdigit() for r in self.retry_after),
                "other_5xx": sum(c >= 500 and c != 503 for c in self.codes), "failed_connections": self.codes.count(0),
                "sampling_s_per_image": round(float(np.mean(self.sampling_share)), 4) if self.sampling_share else None,
                "replicas_busy_denoising": round(sum(self.sampling_share) / (self.wall * replicas), 3),
                **{f"p{q}_ms": round(float(np.percentile(lat, q)), 1) for q in (50, 95, 99)}}


def cpu_per_request(before: tuple, load: Load) -> dict:
    """CPU seconds per answered request over a load, by kind of process (Serve's replicas by
    deployment, its controller and proxy, this process's clients, the rest of Ray), from /proc."""
    (ticks0, _), (ticks1, names) = before, snapshot()
    ok, hz, me, out = max(1, load.codes.count(200)), os.sysconf("SC_CLK_TCK"), str(os.getpid()), {}
    for pid, t in ticks1.items():
        name = names.get(pid) or ""
        kind = ("model replicas" if ":Generator" in name else "ingress" if ":Ingress" in name
                else "serve controller" if "ServeController" in name else "proxy" if "ProxyActor" in name
                else "bench clients" if pid == me else "rest")
        out[kind] = out.get(kind, 0.0) + (t - ticks0.get(pid, t)) / hz / ok
    return {k: round(v, 4) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments["Generator"]
    return int(status.replica_states.get("RUNNING", 0))


def generator_actors(app: str) -> set[str]:
    from ray.util.state import list_actors

    return {a.name for a in list_actors(filters=[("state", "=", "ALIVE")])
            if a.name and app in a.name and "Generator" in a.name}


def register(url: str, n: int) -> list[str]:
    ids = []
    for seed in heldout_seeds(n):
        word = Subject.from_seed(seed).class_word
        photos = [encode_png(render(seed, Context(scene=s), 32)[0]) for s in ("beach", "forest", "city")]
        r = requests.post(f"{url}/v1/subjects", json={"images": [base64.b64encode(p).decode() for p in photos],
                                                      "captions": [f"a {word}"] * 3}, timeout=60)
        r.raise_for_status()
        ids.append(r.json()["subject_id"])
    return ids


def wait_for(predicate, timeout_s: float) -> float | None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if predicate():
            return round(time.time() - t0, 1)
        time.sleep(0.5)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25, help="denoising steps a request (the API's default)")
    parser.add_argument("--rounds", type=int, default=2, help="1- and 2-replica throughput phases, alternating")
    parser.add_argument("--checkpoint", default="checkpoints/tiny-32.safetensors")
    parser.add_argument("--out", default="runs/bench-serve/results.json")
    parser.add_argument("--phases", default="throughput,overload,autoscaling,faults",
                        help="comma-separated subset of the four phases")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    from ray import serve

    init_ray(num_cpus=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url, store = f"http://127.0.0.1:{port}", tempfile.mkdtemp(prefix="suti-subjects-")
    results: dict = {"config": vars(args)}

    def deploy(name: str, **kw) -> str:
        serve.run(build_app(args.checkpoint, store, allow_anonymous=True, **kw), name=name, route_prefix=f"/{name}")
        return f"{url}/{name}"

    if "throughput" in phases:
        throughput(args, deploy, results)
    if "overload" in phases:
        overload(args, deploy, results)
    if "autoscaling" in phases:
        autoscaling(args, deploy, results)
    if "faults" in phases:
        faults(args, deploy, results)
    serve.shutdown()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


def throughput(args, deploy, results: dict) -> None:
    from ray import serve

    # 1. throughput and latency, the same offered load per replica (clients and requests scale with
    # replicas: 16 clients on one replica keep a batch drawing and the next one filling; 16 shared by
    # two would leave each replica idle between its batches, which measures the clients, not Serve).
    # 1 and 2 replicas alternate for --rounds rounds: this machine's speed drifts by ~10% over minutes,
    # which one pair of phases minutes apart would read as scaling.
    configs = {"r1_batch": (dict(min_replicas=1, max_replicas=1), 1),
               "r1_nobatch": (dict(min_replicas=1, max_replicas=1, max_batch_size=1), 1),
               "r2_batch": (dict(min_replicas=2, max_replicas=2), 2)}
    order = ["r1_batch", "r1_nobatch", "r2_batch"] + ["r1_batch", "r2_batch"] * (args.rounds - 1)
    runs: dict = {name: [] for name in configs}
    for name in order:
        kw, scale = configs[name]
        app_url = deploy(name, **kw)
        subjects = register(app_url, 3)
        Load(app_url, subjects, 2, 4, args.steps, 120).run()  # warm-up: feature caches, first-call costs
        before = snapshot()
        load = Load(app_url, subjects, scale * args.clients, scale * args.requests, args.steps, 300).run()
        runs[name].append({**load.summary(replicas=scale), "cpu_s_per_request": cpu_per_request(before, load)})
        print(name, runs[name][-1], flush=True)
        serve.delete(name)
    for name, summaries in runs.items():
        results[name] = summaries[0] if len(summaries) == 1 else {"rounds": summaries}
    rps = {name: [r["throughput_rps"] for r in summaries] for name, summaries in runs.items()}
    results["ratios"] = {
        "batching_vs_not_throughput": round(rps["r1_batch"][0] / rps["r1_nobatch"][0], 3),
        # the ratio of the summed rates (each round's pair weighs the same), and each round's own
        "two_vs_one_replica_throughput": round(sum(rps["r2_batch"]) / sum(rps["r1_batch"]), 3),
        "two_vs_one_by_round": [round(two / one, 3) for one, two in zip(rps["r1_batch"], rps["r2_batch"])]}


def overload(args, deploy, results: dict) -> None:
    from ray import serve

    # 2. overload: a small queue, many clients
    app_url = deploy("overload", min_replicas=1, max_replicas=1, max_queued_requests=4)
    subjects = register(app_url, 3)
    results["overload"] = Load(app_url, subjects, 2 * args.clients, 4 * args.clients, args.steps, 300).run().summary()
    print("overload", results["overload"], flush=True)
    serve.delete("overload")


def autoscaling(args, deploy, results: dict) -> None:
    from ray import serve

    # 3. autoscaling 1 -> 2 under load, back to 1 after it
    app_url = deploy("auto", min_replicas=1, max_replicas=2, target_ongoing_requests=1, downscale_delay_s=5.0)
    subjects = register(app_url, 3)
    load = Load(app_url, subjects, args.clients, 10_000, args.steps, 180).run(block=False)
    up = wait_for(lambda: replicas("auto") >= 2, 150)
    load.stop.set()
    load.join()
    down = wait_for(lambda: replicas("auto") == 1, 120) if up is not None else None
    results["autoscaling"] = {"scaled_up_after_s": up, "scaled_down_after_idle_s": down, "load": load.summary()}
    print("autoscaling", results["autoscaling"], flush=True)
    serve.delete("auto")


def faults(args, deploy, results: dict) -> None:
    import ray
    from ray import serve

    # 4. a replica process killed under load
    app_url = deploy("faults", min_replicas=2, max_replicas=2)
    subjects = register(app_url, 3)
    load = Load(app_url, subjects, args.clients, 10_000, args.steps, 40).run(block=False)
    time.sleep(8)
    victim = sorted(generator_actors("faults"))[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    replaced = wait_for(lambda: len(generator_actors("faults") - {victim}) == 2, 120)
    load.join()
    results["replica_killed_under_load"] = {**load.summary(), "replaced_after_s": replaced}
    serve.delete("faults")


if __name__ == "__main__":
    main()
