"""Batch manifests: read a JSONL or CSV manifest and check every row, without torch.

Each row names ``src``, ``query`` and optionally ``ref``, ``method``, ``mask`` (a file, or ``auto``:
drawn from the prompts), ``seed``, ``steps``, ``guidance``, ``lr``, ``out`` and any option of its method
(``cut_weight``, ``identity_steps``, ...: see :func:`columns`); paths are relative to
the manifest's folder, absent columns take the command-line defaults; ``out`` is a file name ending in one of
:data:`ddsedit.formats.OUTPUT_SUFFIXES`, whose format it is written in (default:
``<src stem>.<method>.png``). :func:`load_manifest` returns the valid rows
and, per bad line, why it is bad (missing or unreadable files, unknown methods, empty
prompts, bad numbers, duplicate output names), so a batch can refuse to start.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ddsedit.automask import AUTO_MASK, SAME_PROMPTS_MESSAGE
from ddsedit.checks import prompt_problems
from ddsedit.errors import InputError
from ddsedit.formats import has_output_suffix, output_suffixes_text
from ddsedit.methods import MASK_NONE, MASK_REQUIRED, get_method, method_names, option_methods
from ddsedit.settings import Declared, EditConfig, cell_value, declared_by_name

TEXT_COLUMNS = ("src", "ref", "query", "method", "mask", "out")
ROW_SETTINGS = ("seed", "steps", "guidance", "lr")  # shared settings a row may set (declared in EditConfig)
REQUIRED_COLUMNS = ("src", "query")
DEFAULT_METHOD = "dds"


def columns() -> tuple[str, ...]:
    """The columns a manifest may have: the text columns, the row settings and every registered method's options."""
    return (*TEXT_COLUMNS[:5], *ROW_SETTINGS, TEXT_COLUMNS[5], *option_methods())


@dataclass(frozen=True)
class RowError:
    """Why one manifest line cannot run."""

    line: int
    reason: str
    src: str = ""  # the row's src as written, when the line could be read as a row


@dataclass(frozen=True)
class ManifestRow:
    """One valid manifest row, with paths resolved and numbers parsed (``None``: use the default)."""

    line: int
    src: Path
    method: str
    query: str
    ref: str
    mask: Path | None
    out: str  # output file name inside the output folder
    seed: int | None
    steps: int | None
    guidance: float | None
    lr: float | None
    image_size: tuple[int, int]  # (w, h) as the editor will see it (EXIF orientation applied)
    identity: tuple[str, ...]  # the row as written: the input of its derived seed
    auto_mask: bool = False  # the mask cell says auto: drawn from the prompts (``mask`` is then None)
    method_settings: dict[str, Any] = field(default_factory=dict)  # the row's cells of its method's options

    def derived_seed(self) -> int:
        """A seed that depends only on what the row says (src, method, prompts, mask, output name)."""
        digest = hashlib.sha256(json.dumps(list(self.identity)).encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") % 2**31


@dataclass
class Manifest:
    """A checked manifest: its valid rows and, per bad line, why it is bad."""

    path: Path
    rows: list[ManifestRow]
    errors: list[RowError]

    def error_lines(self) -> list[str]:
        """``manifest.csv:LINE: reason`` for every bad line, in line order."""
        return [f"{self.path}:{error.line}: {error.reason}" for error in sorted(self.errors, key=lambda e: e.line)]


def read_manifest(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[RowError]]:
    """Read a JSONL or CSV manifest into ``(line, {column: value})`` rows and per-line format errors.

    Blank lines are skipped. Empty CSV cells and JSON nulls count as absent.

    Raises:
        InputError: the file is missing, unreadable, not UTF-8 or not .jsonl/.ndjson/.csv.
    """
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv"):
        raise InputError(f"manifest must be a .jsonl or .csv file, got {path}")
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return _read_csv(handle) if suffix == ".csv" else _read_jsonl(handle)
    except UnicodeDecodeError:
        raise InputError(f"manifest is not UTF-8 text: {path}") from None
    except OSError as error:
        raise InputError(f"cannot read manifest {path}: {error.strerror or error}") from None


def _read_jsonl(lines: Iterator[str]) -> tuple[list[tuple[int, dict[str, Any]]], list[RowError]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    errors: list[RowError] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            errors.append(RowError(number, f"invalid JSON: {error.msg} (column {error.colno})"))
            continue
        if not isinstance(value, dict):
            errors.append(RowError(number, f"expected a JSON object, got {type(value).__name__}"))
            continue
        unknown = sorted(set(value) - set(columns()))
        if unknown:
            reason = f"unknown column(s) {', '.join(unknown)}: use {', '.join(columns())}"
            errors.append(RowError(number, reason, _written_src(value)))
            continue
        rows.append((number, {key: item for key, item in value.items() if item is not None}))
    return rows, errors


def _read_csv(handle: Iterator[str]) -> tuple[list[tuple[int, dict[str, Any]]], list[RowError]]:
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        return [], []
    except csv.Error as error:
        return [], [RowError(1, f"bad CSV header: {error}")]
    names = [name.strip().lower() for name in header]
    problems = []
    unknown = [name for name in names if name not in columns()]
    if unknown:
        problems.append(f"unknown column(s) {', '.join(unknown)}: use {', '.join(columns())}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        problems.append(f"repeated column(s) {', '.join(repeated)}")
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    if problems:
        return [], [RowError(1, "; ".join(problems))]
    rows: list[tuple[int, dict[str, Any]]] = []
    errors: list[RowError] = []
    end_of_previous = reader.line_num
    while True:
        start = end_of_previous + 1  # a quoted cell may span lines: report where the row starts
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            errors.append(RowError(start, f"bad CSV: {error}"))
            end_of_previous = reader.line_num
            continue
        end_of_previous = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(names):
            written = _written_src(dict(zip(names, cells, strict=False)))
            errors.append(RowError(start, f"{len(cells)} cells but the header has {len(names)} columns", written))
            continue
        rows.append((start, {name: cell for name, cell in zip(names, cells, strict=False) if cell.strip()}))
    return rows, errors


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and check every row of a manifest. Needs no model and no torch.

    Raises:
        InputError: the manifest itself cannot be read (see :func:`read_manifest`).
    """
    path = Path(path)
    raw_rows, errors = read_manifest(path)
    base = path.parent
    rows: list[ManifestRow] = []
    first_line_of_output: dict[str, int] = {}
    for line, values in raw_rows:
        row, reasons, out = _check_row(line, values, base)
        if out is not None:
            key = out.casefold()  # case-insensitive file systems would merge these
            if key in first_line_of_output:
                reasons.append(f"duplicate output name {out!r} (also line {first_line_of_output[key]})")
            else:
                first_line_of_output[key] = line
        if reasons:
            errors.extend(RowError(line, reason, _written_src(values)) for reason in reasons)
        elif row is not None:
            rows.append(row)
    return Manifest(path=path, rows=rows, errors=errors)


def _check_row(line: int, values: dict[str, Any], base: Path) -> tuple[ManifestRow | None, list[str], str | None]:
    """Check one row; returns the row (if valid), the reasons it is not, and its output name."""
    reasons: list[str] = []
    text = {name: _text(values, name, reasons) for name in ("src", "ref", "query", "method", "mask", "out")}
    method = (text["method"] or DEFAULT_METHOD).lower()
    known = method in method_names()
    if not known:
        reasons.append(f"unknown method {text['method']!r}: use {', '.join(method_names())}")
    reasons.extend(prompt_problems(method, text["query"], text["ref"]))

    src = image_size = None
    if not text["src"]:
        reasons.append("src must not be empty")
    else:
        src = _resolve(text["src"], base)
        image_size = _image_size(src, "src", reasons)
    mask = None
    if known and get_method(method).mask == MASK_REQUIRED and not text["mask"]:
        reasons.append(f"{method} needs a mask (white = editable)")
    elif known and text["mask"] and get_method(method).mask == MASK_NONE:
        takers = [name for name in method_names() if get_method(name).mask != MASK_NONE]
        reasons.append(f"mask is used by {', '.join(takers)}, not {method}")
    elif text["mask"] == AUTO_MASK:
        if (text["ref"] or "") == (text["query"] or ""):
            reasons.append(SAME_PROMPTS_MESSAGE.replace("--ref and --query", "ref and query"))
    elif text["mask"]:
        mask = _resolve(text["mask"], base)
        _image_size(mask, "mask", reasons)

    shared = declared_by_name(EditConfig)
    seed, steps, guidance, lr = (_setting(values, shared[name], reasons) for name in ROW_SETTINGS)
    method_settings = {}
    readers = option_methods()
    for name in sorted(set(values) & set(readers)):
        if known and get_method(method) not in readers[name]:
            reasons.append(f"{name} is not a setting of {method} (it is of {', '.join(m.name for m in readers[name])})")
            continue
        if known:
            method_settings[name] = _setting(values, declared_by_name(get_method(method).options)[name], reasons)

    out = text["out"]
    if out is not None:
        if "/" in out or "\\" in out or out in (".", ".."):
            reasons.append(f"out must be a file name, not a path: {out!r}")
            out = None
        elif not has_output_suffix(out):
            reasons.append(f"out must end in {output_suffixes_text()} (the format it is written in): {out!r}")
            out = None
    elif text["src"] and known:
        out = f"{Path(text['src']).stem}.{method}.png"

    if reasons or src is None or image_size is None or out is None:
        return None, reasons, out
    identity = (text["src"] or "", method, text["ref"] or "", text["query"] or "", text["mask"] or "", out)
    row = ManifestRow(
        line=line, src=src, method=method, query=text["query"] or "", ref=text["ref"] or "", mask=mask, out=out,
        seed=seed, steps=steps, guidance=guidance, lr=lr, image_size=image_size, identity=identity,
        auto_mask=text["mask"] == AUTO_MASK, method_settings=method_settings,
    )  # fmt: skip
    return row, reasons, out


def _written_src(values: dict[str, Any]) -> str:
    """A row's src as written (for the record of a bad row); empty when absent or not text."""
    src = values.get("src")
    return src if isinstance(src, str) else ""


def _text(values: dict[str, Any], name: str, reasons: list[str]) -> str | None:
    """A text cell, stripped; ``None`` when absent or blank."""
    value = values.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        reasons.append(f"{name} must be text, got {json.dumps(value)}")
        return None
    return value.strip() or None


def _setting(values: dict[str, Any], item: Declared, reasons: list[str]) -> Any:
    """A setting's cell, parsed and checked against its declaration (``None`` when absent); bad values add a reason."""
    value = values.get(item.name)
    if value is None:
        return None
    parsed, problem = cell_value(item, value)
    if problem:
        reasons.append(problem)
        return None
    return parsed


def _resolve(name: str, base: Path) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else base / path


def _image_size(path: Path, what: str, reasons: list[str]) -> tuple[int, int] | None:
    """The image's (w, h) after EXIF orientation, from its header only; a reason if it cannot be read."""
    if not path.exists():
        reasons.append(f"{what} not found: {path}")
        return None
    if path.is_dir():
        reasons.append(f"{what} is a folder, not a file: {path}")
        return None
    try:
        with Image.open(path) as image:
            width, height = image.size
            # A PNG's EXIF may follow the pixels; getexif() would decode them all, so only a leading one counts.
            lazy_exif = image.format == "PNG" and "exif" not in image.info
            orientation = None if lazy_exif else image.getexif().get(0x0112)
    except UnidentifiedImageError:
        reasons.append(f"{what} is not an image file Pillow can read: {path}")
        return None
    except Exception as error:  # noqa: BLE001 - any failure to read is the row's problem
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reasons.append(f"cannot read {what}: {path} ({detail})")
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
