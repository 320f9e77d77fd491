"""Cluster-filter quality against the world's ground truth, on a freshly generated crawl.

    .venv/bin/python bench/filter_quality.py --clip runs/clip/tiny-clip.safetensors [--pages 300]

Prints: junk pages dropped (recall), coherent subject pages kept, near-duplicate records removed.
"""
import argparse
import json
import os
import tempfile

from ray_suti.data.builder import BuildConfig, build_dataset
from ray_suti.data.quality import filter_quality
from ray_suti.world.crawl import WorldConfig, generate_world


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
