#!/usr/bin/env bash
# How checkpoints/tiny-32.safetensors is made and carried on. It ran on a lent H100 machine that has
# no Ray or DeepSpeed (nor a registry to install them from), so it uses the single-process trainer
# (ray_suti/train/local.py: same model, loss, batches, EMA and checkpoint format as the Ray trainer).
#
#   first run:  bash checkpoints/train_tiny32.sh fresh  PRETRAIN_MIN SUTI_MIN
#   carry on:   bash checkpoints/train_tiny32.sh resume SUTI_MIN      (continues from the committed file)
#
# Since session 2 the SuTI stage uses cosine neighbour attention and draws half its timesteps from
# the noisier half (docs/NOTES.md: near-uniform attention and where the demos help); a committed
# file trained without them is switched over on its next resume.
set -euo pipefail
mode=${1:?fresh or resume}
work=${WORK:-/tmp/suti}
out=${OUT_DIR:-checkpoints}
gpu=$(python3 -c "import torch; print('--use-gpu' if torch.cuda.is_available() else '--no-use-gpu')")
procs=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))
mkdir -p "$work" "$out"

# Data without Ray: world pages (web pairs) and oracle ICL-V2 examples, one process per shard.
python3 - "$work" "$procs" "$mode" "${PAGES:-6000}" "${EXAMPLES:-120000}" <<'PY'
import os, sys
from multiprocessing import Pool
from ray_suti.world.crawl import WorldConfig, write_shard
from ray_suti.world.oracle import OracleConfig, write_oracle_shard
work, procs, mode, pages, examples = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
world = WorldConfig(out=f"{work}/world", pages=pages, image_size=32, pages_per_shard=100, seed=1)
oracle = OracleConfig(out=f"{work}/oracle", examples=examples, examples_per_shard=2000, seed=1 if mode == "fresh" else 2)
jobs = [(write_oracle_shard, (oracle, s)) for s in range(-(-examples // 2000))]
if mode == "fresh":
    for d in ("web", "truth"):
        os.makedirs(f"{world.out}/{d}", exist_ok=True)
    jobs += [(write_shard, (world, s)) for s in range(-(-pages // 100))]
os.makedirs(oracle.out, exist_ok=True)
with Pool(procs) as pool:
    for result in [pool.apply_async(f, a) for f, a in jobs]:
        result.get()
print("data ready", flush=True)
PY

common="--batch-size 128 --loader-workers $procs --report-every 250 --probe-every 500 --checkpoint-every 1000000 $gpu --threads 4"
if [ "$mode" = fresh ]; then
  python3 -m ray_suti.train.local --mode pretrain --data "$work/world/web" --steps 1000000 --max-minutes "$2" \
    --noise-repeats 1 --storage-path "$work/runs" --name pretrain --export-file "$work/base.safetensors" $common
  init="$work/base.safetensors"; minutes=$3
else
  init="$out/tiny-32.safetensors"; minutes=$2
fi
python3 -m ray_suti.train.local --mode suti --init-from "$init" --data "$work/oracle" --steps 1000000 \
  --max-minutes "$minutes" --noise-repeats 2 --storage-path "$work/runs" --name suti \
  --neighbour-cosine --high-noise-frac 0.5 \
  --export-file "$out/tiny-32.safetensors.new" $common
mv "$out/tiny-32.safetensors.new" "$out/tiny-32.safetensors"
