#!/usr/bin/env bash
# The prepared GPU check, in groups that each fit one device call:
#   bash benchmarks/gpu_check.sh sd15   # SD 1.5 at 512x512: fp16 against both references, CUDA graph, torch.compile
#                                       # default and reduce-overhead, batch 4, bf16, the methods beyond DDS (~6 min
#                                       # on an H100-class card; the rows added 2026-11-27 and 2026-12-01 untimed)
#   bash benchmarks/gpu_check.sh sdxl   # SDXL base at 1024x1024 (added 2026-12-02, untimed): fp16 against both
#                                       # references, CUDA graph, the methods, then whole edits' peak memory plain
#                                       # and with --cpu-offload (targets: >= 1.4x the two-call fp32 reference,
#                                       # >= 1.2x the batch-4 autocast one, peak <= 14 GiB, offload <= 8 GiB)
#   bash benchmarks/gpu_check.sh flow   # FlowEdit edits at 1024x1024 in bf16 (added 2026-12-02, untimed): Flux.1-dev
#                                       # (24 active steps of 28, 2 transformer samples a step) and SD3-medium (33 of 50,
#                                       # 4 a step: CFG on both branches), random weights, text encoders not loaded
#                                       # (T5 freed after encoding), each against its FLOP floor at 989 TFLOP/s (targets:
#                                       # Flux-dev <= 10 s and peak <= 30 GiB, SD3-medium <= 3 s, each <= 1.3x its floor)
#   bash benchmarks/gpu_check.sh        # every group: sd15, sdxl, flow
# Figures -> $OUT or ./bench-out. The rows most worth having come first in each group, in case time runs out.
# Runs from a checkout without installing: ddsedit is taken from src/ unless it is already installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
GROUP=${1:-all}
mkdir -p "$OUT"
python3 -c "import ddsedit" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name(0))" || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
bench() { name=$1; shift; python3 -m benchmarks.bench_dds --arch sd15 --size 512 --json "$OUT/$name.json" "$@" | tee "$OUT/$name.txt"; }
bench_xl() { name=$1; shift; python3 -m benchmarks.bench_dds --arch sdxl --size 1024 --json "$OUT/$name.json" "$@" | tee "$OUT/$name.txt"; }
if [ "$GROUP" = sd15 ] || [ "$GROUP" = all ]; then
  bench sd15-fp16 --dtype fp16 --steps 20 --warmup 3
  bench sd15-fp16-graph --dtype fp16 --steps 20 --warmup 3 --cuda-graph
  bench sd15-fp16-compile-ro --dtype fp16 --steps 20 --warmup 3 --compile --compile-mode reduce-overhead
  bench sd15-fp16-compile --dtype fp16 --steps 20 --warmup 3 --compile --loops ddsedit
  bench sd15-fp16-k4 --dtype fp16 --steps 20 --warmup 3 --batch-size 4 --loops ddsedit
  bench sd15-fp16-k4-graph --dtype fp16 --steps 20 --warmup 3 --batch-size 4 --cuda-graph --loops ddsedit
  bench sd15-bf16 --dtype bf16 --steps 20 --warmup 3 --loops ddsedit
  bench sd15-fp16-methods --dtype fp16 --steps 20 --warmup 3 --loops ddsedit ddsedit-cds ddsedit-pds ddsedit-ids ddsedit-ids-cut
fi
if [ "$GROUP" = sdxl ] || [ "$GROUP" = all ]; then
  bench_xl sdxl-fp16 --dtype fp16 --steps 10 --warmup 2
  bench_xl sdxl-fp16-graph --dtype fp16 --steps 10 --warmup 2 --cuda-graph --loops ddsedit
  bench_xl sdxl-fp16-methods --dtype fp16 --steps 5 --warmup 1 --loops ddsedit ddsedit-cds ddsedit-pds ddsedit-ids ddsedit-ids-cut
  python3 -m benchmarks.bench_memory --arch sdxl --size 1024 --dtype fp16 --steps 20 --json "$OUT/sdxl-memory.json" | tee "$OUT/sdxl-memory.txt"
fi
if [ "$GROUP" = flow ] || [ "$GROUP" = all ]; then
  for arch in flux-dev sd3-medium; do
    python3 -m benchmarks.bench_flow --arch $arch --size 1024 --dtype bf16 --warmup 1 --repeats 3 \
      --json "$OUT/$arch-flowedit.json" | tee "$OUT/$arch-flowedit.txt"
  done
fi
