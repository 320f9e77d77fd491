"""Apprenticeship on the synthetic world, scored against its exact ground truth.

    .venv/bin/python bench/apprentice_quality.py --clusters 12 --clip checkpoints/tiny-clip.safetensors

Writes ICL clusters of training-world subjects (``oracle_cluster``: what a perfect stage 1 keeps),
runs the apprentice job on them (Ray actors, rejected candidates kept for scoring), renders the
true picture of every candidate's target context and prints, as JSON: the subject PSNR of kept vs
rejected targets (the CLIP filter must enrich good ones), the keep rate overall and per skill, the
same split at other CLIP-I thresholds (to choose the default), and minutes per cluster at tiny-32.
A scatter plot of CLIP-I against subject PSNR goes next to the JSON.
"""
import argparse
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_suti.apprentice.job import ApprenticeConfig, run_apprentice
from ray_suti.evaluate.synthetic import psnr
from ray_suti.schemas import ICL_CLUSTER_SCHEMA
from ray_suti.utils.images import inspect_image
from ray_suti.world import Context, render
from ray_suti.world.oracle import oracle_cluster
from ray_suti.world.subjects import train_seed


def split(cands: list[dict], threshold: float) -> dict:
    kept = [c["subject_psnr"] for c in cands if c["clip_i"] >= threshold]
    rejected = [c["subject_psnr"] for c in cands if c["clip_i"] < threshold]
    mean = lambda v: round(float(np.mean(v)), 3) if v else None  # noqa: E731
    skills = sorted({s for c in cands for s in c["skills"]})
    per_skill = {s: round(float(np.mean([c["clip_i"] >= threshold for c in cands if s in c["skills"]])), 3)
                 for s in skills}
    return {"clip_i_threshold": round(threshold, 4), "keep_rate": round(len(kept) / len(cands), 3),
            "subject_psnr_kept": mean(kept), "subject_psnr_rejected": mean(rejected), "keep_rate_per_skill": per_skill}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clusters", type=int, default=12)
    parser.add_argument("--clip", default="checkpoints/tiny-clip.safetensors")
    parser.add_argument("--checkpoint", default="checkpoints/tiny-32.safetensors")
    parser.add_argument("--out", default="runs/bench-apprentice")
    parser.add_argument("--threshold", type=float, default=ApprenticeConfig.clip_i_threshold)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(123)
    seeds = [train_seed(rng) for _ in range(args.clusters)]
    os.makedirs(f"{args.out}/clusters", exist_ok=True)
    pq.write_table(pa.Table.from_pylist([oracle_cluster(s) for s in seeds], schema=ICL_CLUSTER_SCHEMA),
                   f"{args.out}/clusters/part-0.parquet")
    cfg = ApprenticeConfig(clusters=f"{args.out}/clusters", output=f"{args.out}/apprentice", checkpoint=args.checkpoint,
                           clip_pretrained=args.clip, clip_i_threshold=args.threshold, keep_rejected=True,
                           concurrency=args.concurrency)
    t0 = time.time()
    stats = run_apprentice(cfg)
    wall = time.time() - t0
    images = {r["example_id"]: r["target_image"] for folder in ("examples", "rejected")
              if os.path.isdir(f"{cfg.output}/{folder}")
              for r in pq.read_table(f"{cfg.output}/{folder}", columns=["example_id", "target_image"]).to_pylist()}
    cands = []
    for name in sorted(os.listdir(f"{cfg.output}/status")):
        status = json.load(open(f"{cfg.output}/status/{name}"))
        seed = int(status["cluster_id"].split("-")[1])
        for c in status["candidates"]:
            gt, mask = render(seed, Context.from_json(c["context"]), 32)[:2]
            drawn = np.asarray(inspect_image(images[c["example_id"]])[0].convert("RGB"))
            cands.append({**c, "subject_psnr": psnr(drawn, gt, mask)})
    quantiles = np.quantile([c["clip_i"] for c in cands], [0.5, 0.7, 0.8])
    result = {"clusters": args.clusters, "candidates": len(cands), "at_threshold": split(cands, args.threshold),
              "other_thresholds": [split(cands, q) for q in quantiles], "per_skill": stats["per_skill"],
              "minutes_per_cluster": round(stats["seconds_per_cluster"] / 60, 3),
              "wall_minutes_per_cluster": round(wall / 60 / args.clusters, 3), "concurrency": args.concurrency,
              "spearman_clip_i_vs_subject_psnr": round(float(np.corrcoef(
                  np.argsort(np.argsort([c["clip_i"] for c in cands])),
                  np.argsort(np.argsort([c["subject_psnr"] for c in cands])))[0, 1]), 3)}
    with open(f"{args.out}/results.json", "w") as f:
        json.dump(result, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    kept = np.array([c["clip_i"] >= args.threshold for c in cands])
    x, y = np.array([c["clip_i"] for c in cands]), np.array([c["subject_psnr"] for c in cands])
    ax.scatter(x[kept], y[kept], s=12, label="kept")
    ax.scatter(x[~kept], y[~kept], s=12, label="rejected")
    ax.axvline(args.threshold, color="grey", lw=0.8)
    ax.set(xlabel="CLIP-I (mean cosine to the cluster's photos)", ylabel="subject PSNR vs truth (dB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{args.out}/clip_i_vs_psnr.png", dpi=120)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
