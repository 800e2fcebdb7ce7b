"""Helpers shared by the ``ddsedit batch`` tests: images, manifests, running the command, reading its results."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, PngImagePlugin
from typer.testing import CliRunner

from ddsedit.batch import records
from ddsedit.cli import app

runner = CliRunner()
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def circle(path: Path, colour: str, size: tuple[int, int] = (60, 40)) -> Path:
    """A circle of ``colour`` on light grey, saved as ``path``."""
    image = Image.new("RGB", size, (245, 245, 245))
    ImageDraw.Draw(image).ellipse((10, 5, 40, 35), fill=COLOURS[colour])
    image.save(path)
    return path


def make_images(folder: Path) -> Path:
    """Four circles, a mask, an all-black mask and a truncated PNG in ``folder``."""
    folder.mkdir()
    for colour in COLOURS:
        circle(folder / f"{colour}.png", colour)
    mask = Image.new("L", (60, 40), 0)
    ImageDraw.Draw(mask).rectangle((5, 0, 45, 39), fill=255)
    mask.save(folder / "mask.png")
    Image.new("L", (60, 40), 0).save(folder / "black.png")
    data = (folder / "red.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) - 40])  # header fine, pixels cut short
    return folder


def write_csv(path: Path, header: str, *lines: str) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def manifest_rows(count: int) -> list[dict]:
    """``count`` DDS rows over the four circles, each with its own output name."""
    colours = list(COLOURS)
    return [
        {"src": f"images/{colours[i % 4]}.png", "ref": f"a {colours[i % 4]} circle", "query": "a blue circle",
         "out": f"edit{i}.png"}
        for i in range(count)
    ]  # fmt: skip


def run_cli(manifest: Path, out_dir: Path, model: Path | str, *extra: str):
    """``ddsedit batch MANIFEST --out-dir OUT_DIR --model MODEL --steps 2 EXTRA...`` in this process."""
    return runner.invoke(
        app, ["batch", str(manifest), "--out-dir", str(out_dir), "--model", str(model), "--steps", "2", *extra]
    )


def results(out_dir: Path) -> list[dict]:
    """Every record in ``OUT_DIR/results.jsonl``."""
    return records.read_records(out_dir / "results.jsonl")


def last_run(out_dir: Path) -> list[dict]:
    """The records of the latest run."""
    recorded = results(out_dir)
    return [record for record in recorded if record["run"] == recorded[-1]["run"]]


def rewrite_parameters(path: Path, change: Callable[[dict], dict]) -> None:
    """Re-save a PNG output with its recorded parameters changed (as another ddsedit would have written them)."""
    with Image.open(path) as image:
        recorded = json.loads(image.text["ddsedit"])
        pixels = image.copy()
    info = PngImagePlugin.PngInfo()
    info.add_itxt("ddsedit", json.dumps(change(recorded)))
    pixels.save(path, format="PNG", pnginfo=info)


def environment() -> dict[str, str]:
    """The environment for a batch run in a separate process: one thread, offline."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
