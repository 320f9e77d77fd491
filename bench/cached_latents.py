"""Training from cached inputs (``ray-suti encode``) vs encoding on the fly, in one run.

1. tiny-latent, one process, the same batches (same rows, same seed) both ways: samples/s of the
   whole in-worker step (batch building, encoders where they run, loss, backward, AdamW), steps in
   turn, medians.
2. sd15, counted on the meta device: the FLOPs per example the cache removes from a training step
   (VAE on the target and K demos, text encoder on the prompt and K captions), at the default
   noise repeats.

    .venv/bin/python bench/cached_latents.py [--steps 12] [--batch-size 16] [--out docs/results/cached-latents.json]
"""
import argparse
import json
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from sd15_flops import count_sd15  # noqa: E402

from ray_suti import SuTIPipeline  # noqa: E402
from ray_suti.encode.job import EncodeConfig, LatentEncoder, write_reference  # noqa: E402
from ray_suti.train.config import TrainConfig  # noqa: E402
from ray_suti.train.step import LossModule, make_collate, trainable_groups  # noqa: E402
from ray_suti.world.oracle import OracleConfig, write_oracle_shard  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="docs/results/cached-latents.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp, bs = tempfile.mkdtemp(), args.batch_size
    write_oracle_shard(OracleConfig(out=tmp, examples=bs * 4, examples_per_shard=bs * 4, image_size=64), 0)
    table = pq.read_table(f"{tmp}/part-00000.parquet")
    raw = {k: np.array(table.column(k).to_pylist(), dtype=object) for k in table.column_names}
    enc = EncodeConfig(examples=tmp, output=f"{tmp}/latents", checkpoint="tiny-latent")
    write_reference(enc)
    encoder = LatentEncoder(enc)
    cached = {k: v for k, v in encoder({**raw, "path": np.array([""] * len(table), dtype=object)}).items()}
    results = {"preset": "tiny-latent", "batch_size": bs, "demos": 3, "steps": args.steps, "stored_dtype": enc.dtype}
    runs = {}
    for name, latents, rows in (("on_the_fly", "", raw), ("cached", enc.output, cached)):
        cfg = TrainConfig(latents=latents, batch_size=bs, noise_repeats=1, max_demos=3)
        pipe = SuTIPipeline.from_preset("tiny-latent")
        named, groups = trainable_groups(pipe.model, cfg)
        runs[name] = (make_collate(cfg, pipe, seed=0), LossModule(pipe.model.train(), cfg),
                      torch.optim.AdamW(groups), rows)
    times = {k: [] for k in runs}
    for step in range(args.steps + 2):  # two warm-up steps
        lo = step % 4 * bs
        for name, (collate, loss_module, optimizer, rows) in runs.items():  # in turn: drift hits both alike
            start = time.perf_counter()
            collate.rng = np.random.default_rng(step)
            batch = collate({k: v[lo: lo + bs] for k, v in rows.items()})
            torch.manual_seed(step)
            loss = loss_module(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step >= 2:
                times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        results[f"{name}_samples_per_s"] = bs / statistics.median(t)
    results["speedup"] = results["cached_samples_per_s"] / results["on_the_fly_samples_per_s"]
    print(f"tiny-latent, batch {bs}, 3 demos: on the fly {results['on_the_fly_samples_per_s']:.1f} samples/s, "
          f"cached {results['cached_samples_per_s']:.1f} samples/s ({results['speedup']:.2f}x)")

    f, repeats = count_sd15(3), TrainConfig().noise_repeats  # demos encoded once, the UNet trained at each level
    encoders = (1 + 3) * (f["vae_encode_512px"] + f["text_encoder_77_tokens"])
    step = f["demo_encoding"] + repeats * f["train_fwd_bwd_with_demos"]
    results["sd15_gflop_per_example"] = {"noise_repeats": repeats, "encoders_skipped": encoders, "step_with_cache": step,
                                         "step_without_cache": step + encoders, "saved_fraction": encoders / (step + encoders),
                                         "counted": f}
    print(f"sd15 per example: encoders {encoders:.0f} of {step + encoders:.0f} GFLOP skipped "
          f"({100 * encoders / (step + encoders):.0f}%)")
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
