"""World generation: pages/s with 1 vs 2 concurrent shard tasks, and the driver's peak memory at
1x vs 4x pages (streaming: it should not grow). Each configuration runs in a fresh process.

    .venv/bin/python bench/world_throughput.py [--pages 200]
"""
import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
from ray_suti.world.crawl import WorldConfig, generate_world
pages, in_flight, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
stats = generate_world(WorldConfig(out=out, pages=pages, max_in_flight=in_flight, pages_per_shard=25,
                                   preview_pages=0), progress=False)
print(json.dumps({"pages_per_second": stats["pages_per_second"],
                  "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(pages: int, in_flight: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(pages), str(in_flight), out],
                              capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=200)
    args = parser.parse_args()
    one, two, big = run(args.pages, 1), run(args.pages, 2), run(4 * args.pages, 2)
    print(json.dumps({"1_task": one, "2_tasks": two, "2_tasks_4x_pages": big}, indent=2))
    print(f"speed-up 2 vs 1 tasks: {two['pages_per_second'] / one['pages_per_second']:.2f}x")
    print(f"driver peak memory 4x vs 1x pages: {big['driver_peak_mb'] / two['driver_peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
