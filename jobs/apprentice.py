"""Stage 3: ICL clusters -> ICL-V2 examples drawn by per-cluster DreamBooth experts (Ray actors).

    ray job submit -- python jobs/apprentice.py --clusters s3://bucket/clusters/clusters --output runs/apprentice
"""
import sys

from ray_suti.cli import main

if __name__ == "__main__":
    sys.exit(main(["apprentice", *sys.argv[1:]]))
