"""Stage 1b: image-text pairs (web pairs, an img2dataset crawl or ICL clusters) -> a Re-Imagen
knowledge base (Ray Data embeds, LanceDB stores). Run again with new shards: only those are added.

    ray job submit -- python jobs/index.py --input s3://bucket/crawl --output s3://bucket/kb
"""
import sys

from ray_suti.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
