#!/usr/bin/env bash
# Run sds, dds and masked-dds on the example images; outputs go to ${OUT:-out/examples}.
# MODEL defaults to the bundled shapes model when installed, else pass MODEL=path.
# Works with the virtualenv activated or not: without a ddsedit on PATH it uses the checkout's .venv.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v ddsedit >/dev/null 2>&1; then
  if [ -x ../.venv/bin/ddsedit ]; then
    PATH="$(cd ../.venv/bin && pwd):$PATH"
  else
    echo "ddsedit is not installed: run 'make install' in the checkout (or pip install it) first" >&2
    exit 1
  fi
fi
MODEL=${MODEL:-shapes}
OUT=${OUT:-../out/examples}
mkdir -p "$OUT"
common=(--model "$MODEL" --seed 0 --quiet --overwrite)
ddsedit sds --src red-circle-on-white.png --query "a blue circle on a white background" \
    -o "$OUT/red-circle-on-white.sds.png" "${common[@]}"
ddsedit dds --src red-circle-on-white.png --ref "a red circle on a white background" \
    --query "a blue circle on a white background" -o "$OUT/red-circle-on-white.dds.png" "${common[@]}"
ddsedit masked-dds --src red-circle-on-white.png --mask red-circle-on-white.mask.png \
    --ref "a red circle on a white background" --query "a blue circle on a white background" \
    -o "$OUT/red-circle-on-white.masked-dds.png" "${common[@]}"
ddsedit dds --src blue-square-on-black.png --ref "a blue square on a black background" \
    --query "a yellow square on a black background" -o "$OUT/blue-square-on-black.dds.png" "${common[@]}"
ddsedit dds --src yellow-triangle-on-black.png --ref "a yellow triangle on a black background" \
    --query "a green triangle on a black background" -o "$OUT/yellow-triangle-on-black.dds.png" "${common[@]}"
ddsedit dds --src green-circle-on-white.png --ref "a green circle on a white background" \
    --query "a red circle on a white background" -o "$OUT/green-circle-on-white.dds.png" "${common[@]}"
