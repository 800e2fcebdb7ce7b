#!/usr/bin/env bash
# The prepared GPU check: install ddsedit, run the DDS benchmark for sd15 at 512x512, and
# the batched throughput, in one call (< 6 minutes on an H100-class card). Figures -> $OUT or ./bench-out.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps -e . 2>&1 | tail -1 || true
python3 -c "import torch, diffusers, transformers; print(torch.__version__, torch.cuda.get_device_name(0))"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m benchmarks.bench_dds --arch sd15 --size 512 --dtype fp16 --steps 30 --warmup 5 --json "$OUT/sd15-fp16.json" | tee "$OUT/sd15-fp16.txt"
python3 -m benchmarks.bench_dds --arch sd15 --size 512 --dtype bf16 --steps 30 --warmup 5 --loops ddsedit --json "$OUT/sd15-bf16.json" | tee "$OUT/sd15-bf16.txt"
python3 -m benchmarks.bench_dds --arch sd15 --size 512 --dtype fp16 --steps 20 --warmup 3 --batch-size 4 --loops ddsedit --json "$OUT/sd15-fp16-k4.json" | tee "$OUT/sd15-fp16-k4.txt"
python3 -m benchmarks.bench_dds --arch sd15 --size 512 --dtype fp16 --steps 30 --warmup 5 --compile --loops ddsedit --json "$OUT/sd15-fp16-compile.json" | tee "$OUT/sd15-fp16-compile.txt"
