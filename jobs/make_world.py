"""Stage 0 (embedded default only): the synthetic web crawl.

    ray job submit -- python jobs/make_world.py --out runs/world --pages 1000 --seed 0
"""
import sys

from ray_suti.cli import main

if __name__ == "__main__":
    sys.exit(main(["world", *sys.argv[1:]]))
