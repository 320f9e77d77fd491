"""Multi-node rehearsal on this machine (head + worker node via `ray start` on 127.0.0.1): world,
build_dataset and a 2-worker STRICT_SPREAD training run submitted as jobs; prints which node ran
what. Library: `ray_suti/utils/rehearsal.py`.

    .venv/bin/python bench/multinode_rehearsal.py --pages 40 --train-steps 4 --json docs/results/multinode-rehearsal.json
"""
from ray_suti.utils.rehearsal import main

if __name__ == "__main__":
    main()
