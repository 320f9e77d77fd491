"""Dataset-builder scale: peak memory of the whole job (driver + every Ray process it started) at 1x
vs 10x pages, and CLIP embedding throughput with 2 actors vs 1, measured side by side in one run.
Each build runs in a fresh process with its own local Ray; memory is sampled over its process tree.

    .venv/bin/python bench/build_scale.py [--pages 100] [--clip runs/clip/tiny-clip.safetensors]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil

BUILD = """
import json, sys, time
from ray_suti.data.builder import BuildConfig, build_dataset
inp, out, clip = sys.argv[1:4]
t = time.time()
stats = build_dataset(BuildConfig(input=inp, output=out, clip_pretrained=clip))
print(json.dumps({"seconds": time.time() - t, "records_in": stats["records_in"], "clusters_kept": stats["clusters_kept"]}))
"""

EMBED = """
import json, sys, time
import ray
from ray_suti.data.builder import ClipEmbedder, check_shards, read_web_pairs, validate_records
from ray_suti.utils.ray_utils import init_ray
inp, actors, clip = sys.argv[1], int(sys.argv[2]), sys.argv[3]
files, fs, _ = check_shards(inp, tolerate=False)
init_ray()
ds = read_web_pairs(files, fs).map_batches(validate_records, fn_kwargs={"min_side": 16}, batch_format="pandas")
ds = ds.materialize()  # reading and decoding stay out of the timing
ds = ds.union(*[ds] * 7).materialize()  # 8 passes, so model work outweighs the actors' start-up
n = ds.count()
t = time.time()
ds.map_batches(ClipEmbedder, fn_constructor_kwargs={"model": "tiny", "pretrained": clip, "use_gpu": False},
               batch_size=64, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
               batch_format="pandas").materialize()
print(json.dumps({"records": n, "seconds": time.time() - t, "records_per_s": n / (time.time() - t)}))
"""


def run_measured(code: str, *args: str) -> dict:
    """Runs ``code`` in a fresh Python; returns its JSON line plus the tree's peak RSS in MB."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    peak, root = 0.0, psutil.Process(proc.pid)

    def sample():
        nonlocal peak
        while proc.poll() is None:
            try:
                tree = [root] + root.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed ({proc.returncode})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": round(peak, 1)}


def main() -> None:
    from ray_suti.world.crawl import WorldConfig, generate_world

    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=100)
    parser.add_argument("--clip", default="", help="tiny CLIP weights (ray-suti train-clip); random if empty")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (1, 10):
            generate_world(WorldConfig(out=f"{tmp}/w{scale}", pages=scale * args.pages, image_size=32,
                                       preview_pages=0, seed=11), progress=False)
        small = run_measured(BUILD, f"{tmp}/w1/web", f"{tmp}/o1", args.clip)
        big = run_measured(BUILD, f"{tmp}/w10/web", f"{tmp}/o10", args.clip)
        one = run_measured(EMBED, f"{tmp}/w10/web", "1", args.clip)
        two = run_measured(EMBED, f"{tmp}/w10/web", "2", args.clip)
    print(json.dumps({"build_1x": small, "build_10x": big, "embed_1_actor": one, "embed_2_actors": two}, indent=2))
    print(f"peak memory of the job, 10x vs 1x pages: {big['peak_rss_mb'] / small['peak_rss_mb']:.2f}x")
    print(f"embedding throughput, 2 actors vs 1: {two['records_per_s'] / one['records_per_s']:.2f}x")


if __name__ == "__main__":
    main()
