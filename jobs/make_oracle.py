"""Oracle ICL-V2 examples from the synthetic world (a labelled stand-in for the apprenticeship stage).

    ray job submit -- python jobs/make_oracle.py --out runs/oracle --examples 20000
"""
import sys

from ray_suti.cli import main

if __name__ == "__main__":
    sys.exit(main(["oracle", *sys.argv[1:]]))
