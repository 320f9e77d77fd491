"""Training throughput with 1 vs 2 workers, peak memory per worker under plain data parallel
(ZeRO stage 0, what DDP does), ZeRO-2 and ZeRO-3 on the same model, and the input path: batches
prepared (decoded, tokenized, collated) by Ray Data tasks ahead of the workers, which read them with
``iter_torch_batches`` (the default), vs prepared in the workers, all in one run.

    .venv/bin/python bench/train_scaling.py [--steps 30] [--batch-size 8] [--runs ingest]

Each configuration is a real Ray Train + DeepSpeed run on oracle ICL-V2 data; samples/s is the
last report window (after warm-up), memory is rank 0's peak RSS (the workers are symmetric).
"""
import argparse
import json
import os
import tempfile

from ray_suti.train.config import TrainConfig
from ray_suti.train.trainer import run_training
from ray_suti.utils.ray_utils import init_ray
from ray_suti.world.oracle import OracleConfig, write_oracle


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", choices=["all", "ingest", "zero3"], default="all",
                        help="ingest: only the input-path pair; zero3: only the 2-worker ZeRO-3 run")
    parser.add_argument("--preset", default="tiny-32")
    parser.add_argument("--out", default="docs/results/train-scaling.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "oracle")
        write_oracle(OracleConfig(out=data, examples=512, examples_per_shard=128), progress=False)
        runs = {"1 worker, ZeRO-2": (1, 2, False), "2 workers, ZeRO-0 (DDP)": (2, 0, False),
                "2 workers, ZeRO-2": (2, 2, False), "2 workers, ZeRO-3": (2, 3, False),
                "2 workers, ZeRO-2, decoding in the workers": (2, 2, True)}
        if args.runs != "all":
            runs = {k: v for k, v in runs.items()
                    if k.startswith("2 workers, ZeRO-2" if args.runs == "ingest" else "2 workers, ZeRO-3")}
        results = {}
        for label, (workers, stage, in_worker) in runs.items():
            # 0.5 CPU per worker leaves a whole CPU of this 2-CPU machine to Ray Data, whose file
            # listing and read tasks ask for 1 CPU each (at 0.9 per worker the read never starts).
            cfg = TrainConfig(data=data, preset=args.preset, steps=args.steps, batch_size=args.batch_size, noise_repeats=1,
                              num_workers=workers, zero_stage=stage, report_every=args.steps // 3,
                              decode_in_worker=in_worker,
                              checkpoint_every=10**6, probe_every=10**6, storage_path=os.path.join(tmp, "runs"),
                              name=label.replace(" ", "_").replace(",", ""), cpus_per_worker=0.5)
            m = run_training(cfg)["metrics"]
            results[label] = {"samples_per_s": round(m["samples_per_s"], 2), "peak_rss_mb": round(m["peak_rss_mb"])}
            print(label, results[label], flush=True)
    if args.runs == "zero3":
        print(json.dumps(results, indent=2))
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        return
    two, worker = results["2 workers, ZeRO-2"], results["2 workers, ZeRO-2, decoding in the workers"]
    results["ray_data_decoding_vs_in_worker"] = round(two["samples_per_s"] / worker["samples_per_s"], 3)
    print(json.dumps(results, indent=2))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"2 workers, ZeRO-2: batches prepared by Ray Data vs in the workers: {results['ray_data_decoding_vs_in_worker']:.2f}x")
    if args.runs == "ingest":
        return
    one = results["1 worker, ZeRO-2"]
    print(f"throughput 2 vs 1 workers (ZeRO-2): {two['samples_per_s'] / one['samples_per_s']:.2f}x")
    ddp = results["2 workers, ZeRO-0 (DDP)"]["peak_rss_mb"]
    for stage in ("ZeRO-2", "ZeRO-3"):
        print(f"peak memory per worker, {stage} vs DDP: {results[f'2 workers, {stage}']['peak_rss_mb'] / ddp:.2f}x")


if __name__ == "__main__":
    main()
