"""The README is a user's guide of at most 16,000 bytes, and every relative link in it and in docs/ resolves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 16_000


def test_every_relative_link_resolves() -> None:
    result = subprocess.run([sys.executable, "scripts/check_links.py"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
