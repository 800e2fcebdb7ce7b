"""File formats ddsedit writes; torch-free, so that every command can check a name before the slow imports."""

from __future__ import annotations

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
