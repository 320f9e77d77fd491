#!/usr/bin/env bash
# One lent-GPU session, everything side by side on one GPU (the tiny models leave it mostly idle):
#   - the embedded default's tiny CLIP (`ray-suti train-clip --local --use-gpu`) on the seed-0 world crawl;
#   - SuTI recipe B: `train_tiny32.sh resume` (cosine neighbour attention, half the timesteps noisy);
#   - SuTI recipe C: B plus gradients through the demo encoding (--demo-grad), on B's oracle data.
# Both SuTI runs start from the committed checkpoint; results land in $OUT (B/, C/, logs, CLIP).
#
#   bash checkpoints/lent_gpu.sh MINUTES
#
# The lent machine has no Ray, DeepSpeed, diffusers or open_clip: their wheels travel in .whl/.
set -uo pipefail
minutes=${1:?training minutes}
out=${OUT:-runs/lent-gpu}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
python3 -c "import ray_suti.train.local, ray_suti.data.train_clip, torch; print(torch.__version__, torch.cuda.is_available())" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
oracle=${ORACLE_FROM:-}
python3 -m ray_suti.cli train-clip --local --use-gpu --input "${CLIP_DATA:-runs/train-world/web}" \
  --output "$out/tiny-clip.safetensors" --steps "${CLIP_STEPS:-100000}" --batch-size "${CLIP_BATCH:-512}" \
  --warmup-steps 200 --report-every 250 --max-minutes "$minutes" > "$out/clip.log" 2>&1 &
common="BATCH=${BATCH:-512} LOADER_WORKERS=${LOADER_WORKERS:-6} INIT=checkpoints/tiny-32.safetensors"
env $common WORK=/tmp/suti-b OUT_DIR="$out/B" EXAMPLES=${EXAMPLES:-40000} SHARD=${SHARD:-500} ORACLE_SEED=3 ${oracle:+DATA_FROM=$oracle} \
  bash checkpoints/train_tiny32.sh resume "$minutes" > "$out/B.log" 2>&1 &
oracle=${oracle:-/tmp/suti-b/oracle}
until [ "$(ls "$oracle"/*.parquet 2>/dev/null | wc -l)" -ge 4 ]; do sleep 2; done
env $common WORK=/tmp/suti-c OUT_DIR="$out/C" DATA_FROM="$oracle" \
  SUTI_FLAGS="--neighbour-cosine --high-noise-frac 0.5 --demo-grad" \
  bash checkpoints/train_tiny32.sh resume "$minutes" > "$out/C.log" 2>&1 &
wait
tail -n 4 "$out"/clip.log "$out"/B.log "$out"/C.log
ls -la "$out" "$out"/B "$out"/C
