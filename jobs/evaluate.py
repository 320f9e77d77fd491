"""Stage 5: evaluate a checkpoint on held-out subjects of the synthetic world.

    ray job submit -- python jobs/evaluate.py synthetic --checkpoint PATH --out DIR
"""
import sys

from ray_suti.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
