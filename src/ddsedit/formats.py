"""File formats ddsedit writes; torch-free, so that every command can check a name before the slow imports."""

from __future__ import annotations

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Checkpoint files that are Python pickles: loading one can run code, so it needs --allow-pickle.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
