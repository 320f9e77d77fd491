"""Cluster-filter quality against the world's ground truth, on a freshly generated crawl.

    .venv/bin/python bench/filter_quality.py --clip runs/clip/tiny-clip.safetensors [--pages 300]

Prints: junk pages dropped (recall), coherent subject pages kept, near-duplicate records removed.
"""
import argparse
import json
import os
import tempfile

import pyarrow.parquet as pq

from ray_suti.data.builder import BuildConfig, build_dataset
from ray_suti.world.crawl import WorldConfig, generate_world


def filter_quality(clusters_dir: str, truth_dir: str, min_cluster: int) -> dict:
    truth = pq.read_table(truth_dir).to_pylist()
    rows = pq.read_table(clusters_dir, columns=["page_url", "kept", "keys"]).to_pylist()
    kept_keys = {k for r in rows if r["kept"] for k in r["keys"]}
    pages: dict = {}
    for t in truth:
        pages.setdefault(t["page_index"], []).append(t)
    junk = [p for p in pages.values() if p[0]["page_kind"] == "junk"]
    coherent = [p for p in pages.values() if p[0]["page_kind"] == "subject"
                and sum(not t["is_broken"] and not t["is_dup"] for t in p) >= min_cluster]
    dups = [t for t in truth if t["is_dup"] and not t["is_broken"]]

    def kept(page):
        return any(t["key"] in kept_keys for t in page)

    return {
        "junk_dropped": sum(not kept(p) for p in junk) / max(1, len(junk)),
        "coherent_kept": sum(kept(p) for p in coherent) / max(1, len(coherent)),
        "near_dups_removed": sum(t["key"] not in kept_keys for t in dups) / max(1, len(dups)),
        "n": {"junk_pages": len(junk), "coherent_pages": len(coherent), "dup_records": len(dups)},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clip", default="", help="tiny CLIP weights from ray-suti train-clip")
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7, help="a world seed the CLIP was not trained on")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate_world(WorldConfig(out=os.path.join(tmp, "world"), pages=args.pages, seed=args.seed,
                                   image_size=32, preview_pages=0), progress=False)
        cfg = BuildConfig(input=os.path.join(tmp, "world", "web"), output=os.path.join(tmp, "out"),
                          clip_pretrained=args.clip)
        build_dataset(cfg)
        result = filter_quality(os.path.join(tmp, "out", "clusters"), os.path.join(tmp, "world", "truth"),
                                cfg.min_cluster)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
