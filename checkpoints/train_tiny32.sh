#!/usr/bin/env bash
# How checkpoints/tiny-32.safetensors is made and carried on. It ran on a lent H100 machine that has
# no Ray or DeepSpeed (nor a registry to install them from), so it uses the single-process trainer
# (ray_suti/train/local.py: same model, loss, batches, EMA and checkpoint format as the Ray trainer).
#
#   first run:  bash checkpoints/train_tiny32.sh fresh  PRETRAIN_MIN SUTI_MIN
#   carry on:   bash checkpoints/train_tiny32.sh resume SUTI_MIN      (continues from the committed file)
#   controls:   bash checkpoints/train_tiny32.sh controls MIN         (only the box/keypoint/edge encoders, on
#               oracle targets with position jitter; everything else stays bit-identical)
#
# Environment: BATCH (examples per step, default 512: on a GPU the tiny model is launch-bound, so 512
# costs about what 128 did), SUTI_FLAGS (extra trainer flags), INIT (start
# file of a resume), DATA_FROM (an oracle folder another run is filling: no generation here), WORK,
# OUT_DIR, LOADER_WORKERS, PAGES, EXAMPLES, SHARD (oracle examples per shard: small shards let a
# resume start sooner), ORACLE_SEED (2 in earlier resumes). A resume starts training once a few
# oracle shards exist; the generator goes on in the background and the trainer picks up new shards
# on each pass.
#
# Since session 3 the SuTI stage uses cosine neighbour attention, draws half its timesteps from the
# noisier half and backpropagates through the demo encoding (docs/NOTES.md: near-uniform attention,
# where the demos help, and the side-by-side run that chose --demo-grad).
set -euo pipefail
mode=${1:?fresh or resume}
work=${WORK:-/tmp/suti}
out=${OUT_DIR:-checkpoints}
gpu=$(python3 -c "import torch; print('--use-gpu' if torch.cuda.is_available() else '--no-use-gpu')")
procs=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))
batch=${BATCH:-512}
mkdir -p "$work" "$out"

generate() {
# Data without Ray: world pages (web pairs) and oracle ICL-V2 examples, one process per shard.
python3 - "$work" "$procs" "$mode" "${PAGES:-6000}" "${EXAMPLES:-120000}" "${ORACLE_SEED:-2}" "${SHARD:-2000}" <<'PY'
import os, sys
from multiprocessing import Pool
from ray_suti.world.crawl import WorldConfig, write_shard
from ray_suti.world.oracle import OracleConfig, write_oracle_shard
work, procs, mode, pages, examples, seed, shard = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:])
world = WorldConfig(out=f"{work}/world", pages=pages, image_size=32, pages_per_shard=100, seed=1)
oracle = OracleConfig(out=f"{work}/oracle", examples=examples, examples_per_shard=shard, seed=1 if mode == "fresh" else seed,
                      target_jitter=0.08 if mode == "controls" else 0.0)  # jitter: boxes then matter
jobs = [(write_oracle_shard, (oracle, s)) for s in range(-(-examples // shard))]
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
}
oracle=${DATA_FROM:-$work/oracle}
if [ "$mode" = fresh ]; then
  generate "$@"
elif [ -z "${DATA_FROM:-}" ]; then
  generate "$@" & generator=$!
fi
until [ "$(ls "$oracle"/*.parquet 2>/dev/null | wc -l)" -ge 4 ]; do sleep 2; done

common="--batch-size $batch --loader-workers ${LOADER_WORKERS:-$procs} --report-every 250 --probe-every 500 --checkpoint-every 1000000 $gpu --threads 4"
if [ "$mode" = controls ]; then
  python3 -m ray_suti.train.local --mode suti --init-from "${INIT:-$out/tiny-32.safetensors}" --data "$oracle" \
    --controls box keypoints edges --controls-only --steps 1000000 --max-minutes "$2" --noise-repeats 1 \
    --storage-path "$work/runs" --name controls --export-file "$out/tiny-32.safetensors.new" $common
  mv "$out/tiny-32.safetensors.new" "$out/tiny-32.safetensors"
  [ -n "${generator:-}" ] && pkill -P "$generator" 2>/dev/null || true
  exit 0
fi
if [ "$mode" = fresh ]; then
  python3 -m ray_suti.train.local --mode pretrain --data "$work/world/web" --steps 1000000 --max-minutes "$2" \
    --noise-repeats 1 --storage-path "$work/runs" --name pretrain --export-file "$work/base.safetensors" $common
  init="$work/base.safetensors"; minutes=$3
else
  init=${INIT:-$out/tiny-32.safetensors}; minutes=$2
fi
python3 -m ray_suti.train.local --mode suti --init-from "$init" --data "$oracle" --steps 1000000 \
  --max-minutes "$minutes" --noise-repeats 2 --storage-path "$work/runs" --name suti \
  ${SUTI_FLAGS:---neighbour-cosine --high-noise-frac 0.5 --demo-grad} \
  --export-file "$out/tiny-32.safetensors.new" $common
mv "$out/tiny-32.safetensors.new" "$out/tiny-32.safetensors"
[ -n "${generator:-}" ] && pkill -P "$generator" 2>/dev/null || true  # the generator's python; its pool follows
