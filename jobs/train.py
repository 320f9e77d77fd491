"""Stage 4: SuTI training on ICL-V2 examples (Ray Train + DeepSpeed ZeRO).

    ray job submit -- python jobs/train.py --data DIR --steps N --num-workers 2 --storage-path s3://bucket/runs
"""
import sys

from ray_suti.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
