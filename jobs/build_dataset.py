"""Stage 1: web pairs -> in-context clusters (Ray Data).

    ray job submit -- python jobs/build_dataset.py --input s3://bucket/crawl --output s3://bucket/clusters
"""
import sys

from ray_suti.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-dataset", *sys.argv[1:]]))
