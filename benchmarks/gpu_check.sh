#!/usr/bin/env bash
# The prepared GPU check: the DDS benchmark for sd15 at 512x512 (fp16 against both references, CUDA graph,
# torch.compile default and reduce-overhead, then SDXL at 1024, batch 4, bf16, then the methods beyond DDS),
# in one call (meant
# to fit 6 minutes on an H100-class card; the rows added 2026-11-27 and 2026-12-01 have not been timed yet).
# Figures -> $OUT or ./bench-out.
# Runs from a checkout without installing: ddsedit is taken from src/ unless it is already installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
python3 -c "import ddsedit" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name(0))" || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
bench() { name=$1; shift; python3 -m benchmarks.bench_dds --arch sd15 --size 512 --json "$OUT/$name.json" "$@" | tee "$OUT/$name.txt"; }
bench_xl() { name=$1; shift; python3 -m benchmarks.bench_dds --arch sdxl --size 1024 --json "$OUT/$name.json" "$@" | tee "$OUT/$name.txt"; }
# The rows most worth having come first, in case the call's time runs out.
bench sd15-fp16 --dtype fp16 --steps 20 --warmup 3
bench sd15-fp16-graph --dtype fp16 --steps 20 --warmup 3 --cuda-graph
bench sd15-fp16-compile-ro --dtype fp16 --steps 20 --warmup 3 --compile --compile-mode reduce-overhead
bench sd15-fp16-compile --dtype fp16 --steps 20 --warmup 3 --compile --loops ddsedit
# SDXL base's UNet at 1024x1024 (added 2026-12-02, not timed on a GPU yet): targets >= 1.4x the two-call fp32
# reference, >= 1.2x the batch-4 autocast one, peak <= 14 GiB in fp16.
bench_xl sdxl-fp16 --dtype fp16 --steps 10 --warmup 2
bench_xl sdxl-fp16-graph --dtype fp16 --steps 10 --warmup 2 --cuda-graph --loops ddsedit
bench sd15-fp16-k4 --dtype fp16 --steps 20 --warmup 3 --batch-size 4 --loops ddsedit
bench sd15-fp16-k4-graph --dtype fp16 --steps 20 --warmup 3 --batch-size 4 --cuda-graph --loops ddsedit
bench sd15-bf16 --dtype bf16 --steps 20 --warmup 3 --loops ddsedit
# The methods beyond DDS, each timed against DDS in the same run (added 2026-12-01, not timed on a GPU yet).
bench sd15-fp16-methods --dtype fp16 --steps 20 --warmup 3 --loops ddsedit ddsedit-cds ddsedit-pds ddsedit-ids ddsedit-ids-cut
bench_xl sdxl-fp16-methods --dtype fp16 --steps 5 --warmup 1 --loops ddsedit ddsedit-cds ddsedit-pds ddsedit-ids ddsedit-ids-cut
