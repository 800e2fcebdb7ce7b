"""The shapes eval: render fresh cases, edit them with SDS, DDS and masked DDS, measure.

Each case is a source image from the world and an edit whose right answer is known (the
same case rendered with the query's colour), so success can be measured, not eyeballed:
- recolour: the edited shape's mean colour is nearest the query colour;
- shape IoU: the query-coloured pixels against the source's shape mask (median, per background);
- background change: mean |edited - source| outside the source shape grown by 3 px (0-255 levels);
- dots kept: a grey dot whose pixels stay within 40 levels of grey on average;
- masked DDS: the largest change outside the mask (paste-back keeps it at 0).
Background swaps and shape swaps are reported as well, without a target yet.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ddsedit.editor import EditConfig, Editor, EditRequest
from ddsedit.shapes.metrics import colour_mask, dilate, estimate_background, fit_shape, iou
from ddsedit.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    DOT_GREY,
    DOT_RADIUS,
    IMAGE_SIZE,
    SHAPES,
    ShapeCase,
    caption,
    render,
    sample_case,
)

METHODS = ("sds", "dds", "masked-dds")
DOT_TOLERANCE = 40.0  # levels from grey, on average over a dot's pixels
BACKGROUND_MARGIN = 3  # px around the source shape left out of the background figure
MASK_MARGIN = 4  # px the masked-DDS mask extends beyond the source shape

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]


@dataclass
class EditCase:
    """A source case and the edit asked of it."""

    index: int
    source: ShapeCase
    target: ShapeCase
    seed: int

    @property
    def ref(self) -> str:
        return caption(self.source)

    @property
    def query(self) -> str:
        return caption(self.target)


@dataclass
class CaseScore:
    """The measures of one edited image."""

    recoloured: bool
    iou: float
    background_change: float
    dots_kept: int
    dots: int
    outside_mask_change: float | None = None
    background_right: bool | None = None
    shape_right: bool | None = None


@dataclass
class Report:
    """Aggregates per method, as printed and written to JSON."""

    cases: int
    methods: dict[str, dict[str, float]] = field(default_factory=dict)
    swaps: dict[str, dict[str, float]] = field(default_factory=dict)
    held: dict[str, float] = field(default_factory=dict)  # DDS started at the right answer
    settings: dict[str, object] = field(default_factory=dict)


def recolour_cases(count: int, seed: int) -> list[EditCase]:
    """``count`` recolour edits, half on white and half on black backgrounds, seeded."""
    rng = np.random.default_rng(seed)
    cases = []
    for index in range(count):
        background = list(BACKGROUNDS)[index % len(BACKGROUNDS)]
        source = sample_case(rng, background=background)
        colours = [c for c in COLOURS if c != source.colour]
        target = source.edited(colour=colours[int(rng.integers(len(colours)))])
        cases.append(EditCase(index, source, target, seed=seed * 1000 + index))
    return cases


def swap_cases(count: int, seed: int, kind: str) -> list[EditCase]:
    """Background swaps (white <-> black) or shape swaps (another shape), seeded."""
    rng = np.random.default_rng(seed + 7919)
    cases = []
    for index in range(count):
        source = sample_case(rng)
        if kind == "background":
            target = source.edited(background="black" if source.background == "white" else "white")
        else:
            shapes = [s for s in SHAPES if s != source.shape]
            target = source.edited(shape=shapes[int(rng.integers(len(shapes)))])
        cases.append(EditCase(index, source, target, seed=seed * 1000 + 500 + index))
    return cases


def edit_mask(case: ShapeCase) -> Image.Image:
    """The masked-DDS mask: the source shape grown by MASK_MARGIN px, white = editable."""
    _, shape, _ = render(case)
    return Image.fromarray((dilate(shape, MASK_MARGIN) * 255).astype(np.uint8), mode="L")


def _dots_kept(edited: np.ndarray, dots: list[tuple[int, int]]) -> int:
    grey = np.asarray(DOT_GREY, dtype=np.float32)
    kept = 0
    for col, row in dots:
        disc = (_XX - col) ** 2 + (_YY - row) ** 2 <= DOT_RADIUS**2
        kept += float(np.abs(edited[disc].astype(np.float32) - grey).mean()) <= DOT_TOLERANCE
    return kept


def _mean_shape_colour(edited: np.ndarray, background: str) -> str | None:
    """Nearest palette colour to the mean of the pixels that look like any shape colour."""
    palette = np.array([*COLOURS.values(), BACKGROUNDS[background], DOT_GREY], dtype=np.float32)
    distances = ((edited[:, :, None, :].astype(np.float32) - palette[None, None]) ** 2).sum(-1)
    shape_pixels = distances.argmin(-1) < len(COLOURS)
    if shape_pixels.sum() == 0:
        return None
    mean = edited[shape_pixels].astype(np.float32).mean(0)
    return min(COLOURS, key=lambda name: float(((np.asarray(COLOURS[name]) - mean) ** 2).sum()))


def score_edit(case: EditCase, edited_image: Image.Image, mask: Image.Image | None = None) -> CaseScore:
    """Measure one edited image against its case."""
    source_image, source_shape, dots = render(case.source)
    source = np.asarray(source_image)
    edited = np.asarray(edited_image.convert("RGB"))
    target = case.target
    edited_shape = colour_mask(edited, target.colour, target.background)
    outside = ~dilate(source_shape, BACKGROUND_MARGIN)
    change = np.abs(edited.astype(np.float32) - source.astype(np.float32))
    score = CaseScore(
        recoloured=_mean_shape_colour(edited, target.background) == target.colour,
        iou=iou(edited_shape, source_shape),
        background_change=float(change[outside].mean()),
        dots_kept=_dots_kept(edited, dots),
        dots=len(dots),
    )
    if mask is not None:
        score.outside_mask_change = float(change[np.asarray(mask) == 0].max())
    if target.background != case.source.background:
        score.background_right = estimate_background(edited) == target.background
    if target.shape != case.source.shape:
        score.shape_right = fit_shape(edited_shape)[0] == target.shape
    return score


def summarise(cases: list[EditCase], scores: list[CaseScore]) -> dict[str, float]:
    """The report's figures for one method."""
    by_background = {
        background: [s.iou for c, s in zip(cases, scores, strict=True) if c.source.background == background]
        for background in BACKGROUNDS
    }
    summary = {
        "recolour_rate": float(np.mean([s.recoloured for s in scores])),
        "iou_median": float(statistics.median(s.iou for s in scores)),
        **{
            f"iou_median_{background}": float(statistics.median(values))
            for background, values in by_background.items()
            if values
        },
        "background_change": float(np.mean([s.background_change for s in scores])),
        "dots_kept_rate": float(sum(s.dots_kept for s in scores) / max(1, sum(s.dots for s in scores))),
    }
    outside = [s.outside_mask_change for s in scores if s.outside_mask_change is not None]
    if outside:
        summary["outside_mask_max_change"] = float(max(outside))
    return summary


def run_edits(
    editor: Editor, cases: list[EditCase], method: str, config: EditConfig, batch_size: int,
    start_at_target: bool = False,
) -> tuple[list[Image.Image], list[Image.Image | None]]:  # fmt: skip
    """Edit every case with ``method``, ``batch_size`` images per UNet call.

    ``start_at_target`` starts the optimisation at the right answer (the target image) instead of
    the source: how far the method then drifts is the error it makes even with a perfect path.
    """
    edited: list[Image.Image] = []
    masks: list[Image.Image | None] = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        chunk_masks = [edit_mask(case.source) if method == "masked-dds" else None for case in chunk]
        requests = [
            EditRequest(render(case.source)[0], query=case.query, ref=case.ref, mask=mask, seed=case.seed,
                        start=render(case.target)[0] if start_at_target else None)
            for case, mask in zip(chunk, chunk_masks, strict=True)
        ]
        edited += [result.image for result in editor.edit_batch(requests, method, config=config)]
        masks += chunk_masks
    return edited, masks


def grid(rows: list[list[Image.Image]], scale: int = 2) -> Image.Image:
    """Tile images (rows of equal length) into one picture, each scaled up without smoothing."""
    tile = IMAGE_SIZE * scale
    picture = Image.new("RGB", (tile * len(rows[0]), tile * len(rows)), (128, 128, 128))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            picture.paste(image.resize((tile, tile), Image.Resampling.NEAREST), (c * tile, r * tile))
    return picture


def evaluate(
    editor: Editor,
    count: int = 40,
    seed: int = 0,
    config: EditConfig | None = None,
    swaps: int = 8,
    batch_size: int = 8,
    grid_rows: int = 12,
    hold: bool = True,
) -> tuple[Report, Image.Image]:
    """Run the whole eval; returns the report and a grid (source, target, sds, dds, masked-dds).

    With ``hold``, DDS also runs from the right answer (the target image) on the same cases: the
    figures it ends at bound what DDS can reach with this model and these settings.
    """
    config = config or editor.config()
    cases = recolour_cases(count, seed)
    report = Report(cases=count, settings={k: v for k, v in asdict(config).items() if k != "seed"})
    edited_by_method: dict[str, list[Image.Image]] = {}
    for method in METHODS:
        edited, masks = run_edits(editor, cases, method, config, batch_size)
        scores = [score_edit(c, image, mask) for c, image, mask in zip(cases, edited, masks, strict=True)]
        report.methods[method] = summarise(cases, scores)
        edited_by_method[method] = edited
    if hold:
        edited, _ = run_edits(editor, cases, "dds", config, batch_size, start_at_target=True)
        scores = [score_edit(c, image) for c, image in zip(cases, edited, strict=True)]
        report.held = summarise(cases, scores)
    for kind in ("background", "shape"):
        if swaps <= 0:
            break
        kind_cases = swap_cases(swaps, seed, kind)
        edited, _ = run_edits(editor, kind_cases, "dds", config, batch_size)
        scores = [score_edit(c, image) for c, image in zip(kind_cases, edited, strict=True)]
        right = [s.background_right if kind == "background" else s.shape_right for s in scores]
        report.swaps[kind] = {
            "success_rate": float(np.mean(right)),
            "iou_median": float(statistics.median(s.iou for s in scores)),
            "dots_kept_rate": float(sum(s.dots_kept for s in scores) / max(1, sum(s.dots for s in scores))),
        }
    rows = [
        [render(case.source)[0], render(case.target)[0], *(edited_by_method[m][case.index] for m in METHODS)]
        for case in cases[:grid_rows]
    ]
    return report, grid(rows)


def format_report(report: Report) -> str:
    """The report as a plain-text table (also the README's)."""
    lines = [
        f"shapes eval: {report.cases} recolour cases",
        "| method | recolour | IoU median (white) | IoU median (black) | background change /255 | dots kept "
        "| outside-mask max change |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, figures in report.methods.items():
        outside = figures.get("outside_mask_max_change")
        lines.append(
            f"| {method} | {figures['recolour_rate']:.0%} | {figures.get('iou_median_white', float('nan')):.3f} "
            f"| {figures.get('iou_median_black', float('nan')):.3f} | {figures['background_change']:.2f} "
            f"| {figures['dots_kept_rate']:.0%} | {'' if outside is None else f'{outside:.0f}'} |"
        )
    if report.held:
        held = report.held
        lines.append(
            f"DDS started at the right answer: IoU median {held.get('iou_median_white', float('nan')):.3f} white, "
            f"{held.get('iou_median_black', float('nan')):.3f} black, background change "
            f"{held['background_change']:.2f}, recolour {held['recolour_rate']:.0%}"
        )
    for kind, figures in report.swaps.items():
        lines.append(
            f"DDS {kind} swap: success {figures['success_rate']:.0%}, shape IoU median {figures['iou_median']:.3f}, "
            f"dots kept {figures['dots_kept_rate']:.0%}"
        )
    return "\n".join(lines)


def write_report(report: Report, picture: Image.Image, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``grid.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(asdict(report), indent=2))
    grid_path = out_dir / "grid.png"
    picture.save(grid_path)
    return json_path, grid_path
