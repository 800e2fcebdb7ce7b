"""The image formats ddsedit writes, named by the output's extension; torch-free.

One list for the command line, batch manifests and :mod:`ddsedit.imageio`, which writes
PNG, JPEG or WebP according to it.
"""

from __future__ import annotations

import os
from pathlib import Path

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def has_output_suffix(name: str | os.PathLike) -> bool:
    """Whether ``name`` ends in one of :data:`OUTPUT_SUFFIXES` (any case)."""
    return Path(name).suffix.lower() in OUTPUT_SUFFIXES


def output_suffixes_text() -> str:
    """The allowed suffixes for a message: ``.png, .jpg, .jpeg or .webp``."""
    return ", ".join(OUTPUT_SUFFIXES[:-1]) + " or " + OUTPUT_SUFFIXES[-1]

# Checkpoint files that are Python pickles: loading one can run code, so it needs --allow-pickle.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
