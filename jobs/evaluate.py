"""Stage 5: evaluate a checkpoint on held-out synthetic subjects or on DreamBench.

    ray job submit -- python jobs/evaluate.py synthetic --checkpoint PATH --out DIR
    ray job submit -- python jobs/evaluate.py dreambench --checkpoint PATH --data DIR --out DIR
    ray job submit -- python jobs/evaluate.py controls --checkpoint PATH --out DIR
    ray job submit -- python jobs/evaluate.py retrieval --checkpoint PATH --out DIR
"""
import sys

from ray_suti.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
