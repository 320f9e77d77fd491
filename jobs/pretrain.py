"""Stage 2: base text-to-image pretraining on web pairs (Ray Train + DeepSpeed ZeRO).

    ray job submit -- python jobs/pretrain.py --data DIR --steps N --num-workers 2 --storage-path s3://bucket/runs
"""
import sys

from ray_suti.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
