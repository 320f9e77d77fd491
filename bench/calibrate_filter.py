"""Sweeps the cluster filter's two thresholds on a validation crawl, scored against its truth.

    .venv/bin/python bench/calibrate_filter.py --clip checkpoints/tiny-clip.safetensors [--seed 5 --pages 300]

Use a world seed that neither the CLIP's training (0) nor the filter test (7) uses. Embeds every
valid record once with the builder's own functions (no Ray Data pass per setting), then runs the
builder's ``make_cluster`` for each (duplicate, coherence) pair. Prints a JSON table and the pair
with the widest lead over issue 5's bar; that pair is what BuildConfig's defaults should hold.
"""
import argparse
import json
import os
import tempfile

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ray_suti.data.builder import BuildConfig, make_cluster, validate_records
from ray_suti.data.clip import default_shifts, embed_images, load_clip
from ray_suti.data.quality import margin, score_filter
from ray_suti.utils.images import inspect_image
from ray_suti.world.crawl import WorldConfig, generate_world


def embedded_records(web_dir: str, clip_path: str) -> pd.DataFrame:
    records = validate_records(pq.read_table(web_dir).to_pandas(), min_side=BuildConfig.min_side)
    clip, size = load_clip("tiny", clip_path)
    valid = records["reason"] == ""
    feats = np.concatenate([embed_images(clip, [inspect_image(x)[0] for x in chunk], size, shifts=default_shifts("tiny"))
                            for chunk in np.array_split(records.loc[valid, "image"].to_numpy(), 64)])
    embeddings = [[] for _ in range(len(records))]
    for i, f in zip(np.flatnonzero(valid.to_numpy()), feats):
        embeddings[i] = f.tolist()
    return records.assign(embedding=embeddings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clip", required=True, help="tiny CLIP weights")
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--seed", type=int, default=5, help="validation world: not 0 (CLIP training) or 7 (the test)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = WorldConfig(out=os.path.join(tmp, "world"), pages=args.pages, seed=args.seed, image_size=32,
                            preview_pages=0)
        generate_world(world, progress=False)
        records = embedded_records(os.path.join(world.out, "web"), args.clip)
        truth = pq.read_table(os.path.join(world.out, "truth")).to_pylist()
    pages = [g for _, g in records[records["page_key"] != ""].groupby("page_key")]
    table = []
    for dup in (0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98):
        for coh in np.round(np.arange(0.2, 0.81, 0.025), 3):
            cfg = BuildConfig(duplicate_threshold=dup, coherence_threshold=float(coh))
            rows = [make_cluster(g, cfg).to_pylist()[0] for g in pages]
            q = score_filter(truth, rows, cfg.min_cluster)
            table.append({"duplicate_threshold": dup, "coherence_threshold": float(coh), **q,
                          "margin": round(margin(q), 4)})
    best = max(table, key=lambda r: r["margin"])
    print(json.dumps({"seed": args.seed, "pages": args.pages, "best": best,
                      "table": [{k: v for k, v in r.items() if k != "n"} for r in table]}, indent=1))


if __name__ == "__main__":
    main()
