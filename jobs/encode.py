"""Stage 3b: ICL-V2 examples -> cached VAE latents and text-encoder states (Ray Data actor pool).

    ray job submit -- python jobs/encode.py --examples s3://bucket/apprentice/examples --output s3://bucket/latents \\
        --checkpoint s3://bucket/models/suti-sd15 --actors 8 --num-gpus 1
"""
import sys

from ray_suti.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
