#!/usr/bin/env bash
# One borrowed-GPU call: train the shapes UNet on the GPU (VAE taken from the bundled model), evaluate it
# against the bundled model on the same cases, run the sd15 speed benchmark, then a settings grid.
# Usage (device machine, repo root; .whl/ holds diffusers' wheels where diffusers is missing, made where pip
# works with: pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#   --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 importlib_metadata):
#   UNET_MINUTES=3.5 bash scripts/gpu_session.sh      # results in $OUT; the UNet phase takes UNET_MINUTES after ~80 s of start-up and pool
#   INIT=--init-model UNET_MINUTES=5 bash scripts/gpu_session.sh   # continue the bundled model's UNet and text
#                                                     # encoder instead of training a UNet from scratch on its VAE
# EVAL_CASES (40) and EVAL_SECONDS (120, per model) size the eval; the two reports are compared case by case.
# BENCH_SECONDS=0 skips the sd15 benchmark (already in the README), TUNE_SECONDS=0 the grid.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ! python3 -c "import diffusers" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the root: python -m shapes_training.*
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/train.log"
python3 -c "import torch, diffusers, transformers, typer; print(torch.__version__, diffusers.__version__, transformers.__version__, typer.__version__)" | tee -a "$OUT/train.log"

RUN=/tmp/shapes-gpu
# the UNet budget plus start-up, the pool (~80 s with 14 workers on a 16-core machine) and the export
timeout "${TRAIN_SECONDS:-$(python3 -c "print(int(${UNET_MINUTES:-3.5} * 60 + 150))")}" python3 -m shapes_training.train --out $RUN --config "${CONFIG:-gpu}" --device "${DEVICE:-cuda}" \
  --pool-workers "${POOL_WORKERS:-14}" "${INIT:---init-vae}" src/ddsedit/bundled/shapes --unet-minutes "${UNET_MINUTES:-3.5}" --threads 4 \
  2>&1 | grep -v "Writing model shards\|Loading weights" | tee -a "$OUT/train.log"
[ -d $RUN/final ] && tar -C $RUN -cf "$OUT/model.tar" final

EVAL_DIR=$(mktemp -d /tmp/eval.XXXX)  # fresh each call: no report of an earlier run is compared
for model in shapes $RUN/final; do
  name=$(basename "$(dirname $model)"); [ "$model" = shapes ] && name=bundled
  [ -e "$model" ] || [ "$model" = shapes ] || continue
  timeout "${EVAL_SECONDS:-120}" python3 -m ddsedit eval-shapes --model "$model" --cases "${EVAL_CASES:-40}" --swaps 8 --batch-size 40 \
    --device "${DEVICE:-cuda}" --out-dir "$EVAL_DIR/$name" 2>&1 | tee "$EVAL_DIR/$name.txt"
done
tar -C "$EVAL_DIR" -cf "$OUT/eval.tar" .
[ -f "$EVAL_DIR/shapes-gpu/report.json" ] && python3 -m ddsedit.shapes.compare "$EVAL_DIR/bundled/report.json" \
  "$EVAL_DIR/shapes-gpu/report.json" | tee "$OUT/compare.txt"

# BENCH_SECONDS=0 / TUNE_SECONDS=0 skip a step (`timeout 0` would mean no limit at all)
if [ "${BENCH_SECONDS:-240}" -gt 0 ]; then
  mkdir -p /tmp/bench
  OUT=/tmp/bench timeout "${BENCH_SECONDS:-240}" bash benchmarks/gpu_check.sh sd15 2>&1 | tail -40 > /tmp/bench/log.txt
  tar -C /tmp -cf "$OUT/bench.tar" bench
  cat /tmp/bench/*.txt
fi

# Settings grid for the new model's edit defaults (partial results are kept if the time runs out).
[ -d $RUN/final ] && [ "${TUNE_SECONDS:-90}" -gt 0 ] && timeout "${TUNE_SECONDS:-90}" python3 -m shapes_training.tune --model $RUN/final --cases 40 \
  --batch-size 40 --device "${DEVICE:-cuda}" --methods dds,sds --out "$OUT/tune.jsonl" \
  --grid '{"guidance": [5, 6, 7.5, 10], "t_max": [950, 999]}' > /dev/null 2>&1
echo "done at $(date)"
