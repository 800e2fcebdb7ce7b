"""The shapes eval: render fresh cases, edit them with every method (SDS, DDS, masked DDS, CDS, PDS, IDS), measure.

Each case is a source image from the world and an edit whose right answer is known (the
same case rendered with the query's colour), so success can be measured, not eyeballed:
- recolour: the edited shape's mean colour is nearest the query colour;
- shape IoU: the query-coloured pixels against the source's shape mask (median, per background);
- background change: mean |edited - source| outside the source shape grown by 3 px (0-255 levels);
- dots kept: a grey dot whose pixels stay within 40 levels of grey on average;
- masked DDS: the largest change outside the mask (paste-back keeps it at 0);
- old colour left: pixels still nearest the source's colour, over the source shape's area (e.g. a rim
  of the old colour that a paste-back seam keeps);
- the automatic mask (``masked-dds-auto``: masked DDS with ``--mask auto``): how much of the source shape
  it covers and how much of it lies within MASK_MARGIN px of the shape (medians, per background).
Background swaps and shape swaps are reported as well, without a target yet. Each figure comes
with a 95% bootstrap interval over the cases, and ``report.json`` keeps every case's scores so
that two runs on the same cases can be compared case by case (``python -m ddsedit.shapes.compare``).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ddsedit.automask import AUTO_MASK, AutoMaskSettings
from ddsedit.editor import EditConfig, Editor, EditRequest
from ddsedit.errors import InputError
from ddsedit.methods import get_method, method_names
from ddsedit.names import MASKED_METHOD
from ddsedit.settings import option_names
from ddsedit.shapes.metrics import colour_mask, dilate, estimate_background, fit_shape, iou
from ddsedit.shapes.stats import bootstrap_interval
from ddsedit.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    DOT_GREY,
    DOT_RADIUS,
    IMAGE_SIZE,
    SHAPES,
    ShapeCase,
    caption,
    dots_mask,
    render,
    sample_case,
)

DOT_TOLERANCE = 40.0  # levels from grey, on average over a dot's pixels
BACKGROUND_MARGIN = 3  # px around the source shape left out of the background figure
MASK_MARGIN = 4  # px the masked-DDS mask extends beyond the source shape
AUTO_MASK_RUN = f"{MASKED_METHOD}-{AUTO_MASK}"  # masked DDS with the automatic mask
AUTO_MASK_FIGURES = "auto-mask"  # the automatic mask's own figures, in intervals and case_scores

def eval_runs(family: str | None = None) -> tuple[str, ...]:
    """What ``methods`` may name: every registered method (``family``: those that support it), and masked DDS with
    the automatic mask."""
    return (*(name for name in method_names() if family is None or family in get_method(name).families), AUTO_MASK_RUN)


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
    old_colour_left: float | None = None  # recolours: pixels nearest the source colour / the source shape's area


@dataclass
class Report:
    """Aggregates per method, as printed and written to JSON."""

    cases: int
    methods: dict[str, dict[str, float]] = field(default_factory=dict)
    swaps: dict[str, dict[str, float]] = field(default_factory=dict)
    held: dict[str, float] = field(default_factory=dict)  # DDS started at the right answer
    settings: dict[str, object] = field(default_factory=dict)  # the shared settings (DDS's)
    method_settings: dict[str, dict[str, object]] = field(default_factory=dict)  # each method's own, beyond DDS's
    seed: int = 0  # of the cases: runs with the same seed and count edited the same cases
    # 95% bootstrap interval [low, high] of each figure, per run ("sds", "dds", "masked-dds", "held")
    intervals: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    case_scores: dict[str, list[dict[str, object]]] = field(default_factory=dict)  # per run, in case order
    masks: dict[str, float] = field(default_factory=dict)  # the automatic mask's coverage and precision
    mask_settings: dict[str, object] = field(default_factory=dict)  # how the automatic masks were drawn


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


@dataclass
class MaskScore:
    """How well an automatic mask fits the source shape (fractions of pixels)."""

    coverage: float  # of the shape's pixels inside the mask
    precision: float  # of the mask's pixels within MASK_MARGIN px of the shape
    dots_covered: float  # of the grey dots' pixels inside the mask (what the edit may then repaint)


def score_mask(case: ShapeCase, mask: Image.Image) -> MaskScore:
    """Measure an automatic mask (white = editable, 64x64) against the source shape it should cover."""
    _, shape, dots = render(case)
    inside = np.asarray(mask.convert("L")) >= 128
    near = dilate(shape, MASK_MARGIN)
    dot_pixels = dots_mask(dots)
    return MaskScore(
        coverage=float((inside & shape).sum() / max(1, shape.sum())),
        precision=float((inside & near).sum() / max(1, inside.sum())),
        dots_covered=float((inside & dot_pixels).sum() / max(1, dot_pixels.sum())),
    )


def mask_figure_values(
    backgrounds: list[str], scores: list[MaskScore]
) -> dict[str, tuple[np.ndarray, Callable[[np.ndarray], float]]]:
    """The automatic mask's figures as (one value per case, the statistic over cases): medians per background."""
    figures: dict[str, tuple[np.ndarray, Callable[[np.ndarray], float]]] = {}
    for name in ("coverage", "precision"):
        for background in BACKGROUNDS:
            values = [getattr(s, name) for b, s in zip(backgrounds, scores, strict=True) if b == background]
            if values:
                figures[f"{name}_median_{background}"] = (np.array(values), _median)
    figures["dots_covered"] = (np.array([s.dots_covered for s in scores]), _mean)
    return figures


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
    if target.colour != case.source.colour:
        score.old_colour_left = _old_colour_left(edited, case, source_shape)
    return score


def _old_colour_left(edited: np.ndarray, case: EditCase, source_shape: np.ndarray) -> float:
    """Pixels nearer the source colour than the query colour, the background and the dots' grey, over the
    source shape's area: what a recolour left of the old colour (a rim at a paste-back seam, an unedited part)."""
    palette = np.array(
        [COLOURS[case.source.colour], COLOURS[case.target.colour], BACKGROUNDS[case.target.background], DOT_GREY],
        dtype=np.float32,
    )
    distances = ((edited[:, :, None, :].astype(np.float32) - palette[None, None]) ** 2).sum(-1)
    return float((distances.argmin(-1) == 0).sum() / max(1, source_shape.sum()))


def _ratio(columns: np.ndarray) -> float:
    """Kept dots over all dots, from rows of (kept, count)."""
    return float(columns[:, 0].sum() / max(1.0, columns[:, 1].sum()))


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def _median(values: np.ndarray) -> float:
    return float(np.median(values))


def figure_values(
    backgrounds: list[str], scores: list[CaseScore]
) -> dict[str, tuple[np.ndarray, Callable[[np.ndarray], float]]]:
    """Each figure of the report as (one value per case, the statistic over cases)."""
    figures: dict[str, tuple[np.ndarray, Callable[[np.ndarray], float]]] = {
        "recolour_rate": (np.array([float(s.recoloured) for s in scores]), _mean),
        "iou_median": (np.array([s.iou for s in scores]), _median),
    }
    for background in BACKGROUNDS:
        values = [s.iou for b, s in zip(backgrounds, scores, strict=True) if b == background]
        if values:
            figures[f"iou_median_{background}"] = (np.array(values), _median)
    figures["background_change"] = (np.array([s.background_change for s in scores]), _mean)
    figures["dots_kept_rate"] = (np.array([[s.dots_kept, s.dots] for s in scores], dtype=np.float64), _ratio)
    if scores and all(s.old_colour_left is not None for s in scores):  # reports before it was measured lack it
        figures["old_colour_left"] = (np.array([s.old_colour_left for s in scores], dtype=np.float64), _mean)
    return figures


def summarise(cases: list[EditCase], scores: list[CaseScore]) -> dict[str, float]:
    """The report's figures for one method."""
    backgrounds = [case.source.background for case in cases]
    summary = {name: statistic(values) for name, (values, statistic) in figure_values(backgrounds, scores).items()}
    outside = [s.outside_mask_change for s in scores if s.outside_mask_change is not None]
    if outside:
        summary["outside_mask_max_change"] = float(max(outside))
    return summary


def summarise_intervals(cases: list[EditCase], scores: list[CaseScore]) -> dict[str, list[float]]:
    """The 95% bootstrap interval [low, high] over cases of each of ``summarise``'s figures."""
    backgrounds = [case.source.background for case in cases]
    return {
        name: list(bootstrap_interval(values, statistic))
        for name, (values, statistic) in figure_values(backgrounds, scores).items()
    }


def case_records(cases: list[EditCase], scores: list[CaseScore]) -> list[dict[str, object]]:
    """Every case's scores, with its index and background, as the JSON report keeps them."""
    return [
        {"index": case.index, "background": case.source.background, **asdict(score)}
        for case, score in zip(cases, scores, strict=True)
    ]


ProgressCallback = Callable[[str, int], None]  # (what is running, edits finished in this call)


def run_edits(
    editor: Editor, cases: list[EditCase], method: str, config: EditConfig, batch_size: int,
    start_at_target: bool = False, on_progress: ProgressCallback | None = None, label: str | None = None,
    mask_settings: AutoMaskSettings | None = None,
) -> tuple[list[Image.Image], list[Image.Image | None]]:  # fmt: skip
    """Edit every case with ``method``, ``batch_size`` images per UNet call.

    ``method`` may be :data:`AUTO_MASK_RUN`: masked DDS with a mask drawn from the prompts
    (``mask_settings``, seeded with each case's seed); the masks returned are then the ones drawn.

    ``start_at_target`` starts the optimisation at the right answer (the target image) instead of
    the source: how far the method then drifts is the error it makes even with a perfect path.
    ``on_progress(label, count)`` is called after each UNet batch with the edits it finished.
    """
    edited: list[Image.Image] = []
    masks: list[Image.Image | None] = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        chunk_masks = [edit_mask(case.source) if method == "masked-dds" else None for case in chunk]
        auto = method == AUTO_MASK_RUN
        requests = [
            EditRequest(render(case.source)[0], query=case.query, ref=case.ref, mask=mask, seed=case.seed,
                        start=render(case.target)[0] if start_at_target else None)
            for case, mask in zip(chunk, chunk_masks, strict=True)
        ]
        if auto:
            for request in requests:
                request.mask = mask_settings or AutoMaskSettings()
        results = editor.edit_batch(requests, MASKED_METHOD if auto else method, config=config)
        edited += [result.image for result in results]
        masks += [result.mask for result in results] if auto else chunk_masks
        if on_progress is not None:
            on_progress(label or method, len(chunk))
    return edited, masks


GRID_LABEL_HEIGHT = 20  # px of the header row that names each column


def grid(rows: list[list[Image.Image]], labels: list[str] | None = None, scale: int = 2) -> Image.Image:
    """Tile images (rows of equal length) into one picture, each scaled up without smoothing.

    ``labels`` (one per column) are written in a header row above the tiles.
    """
    from PIL import ImageDraw

    tile = IMAGE_SIZE * scale
    top = GRID_LABEL_HEIGHT if labels else 0
    picture = Image.new("RGB", (tile * len(rows[0]), top + tile * len(rows)), (128, 128, 128))
    if labels:
        draw = ImageDraw.Draw(picture)
        draw.rectangle((0, 0, picture.width, top - 1), fill=(255, 255, 255))
        for c, label in enumerate(labels):
            draw.text((c * tile + 4, 4), label, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            picture.paste(image.resize((tile, tile), Image.Resampling.NEAREST), (c * tile, top + r * tile))
    return picture


def edit_count(count: int, swaps: int, hold: bool, methods: tuple[str, ...]) -> int:
    """How many edits :func:`evaluate` runs: every method and the held run on each case, then the swaps."""
    return count * (len(methods) + hold) + 2 * max(0, swaps)


def evaluate(
    editor: Editor,
    count: int = 40,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    swaps: int = 8,
    batch_size: int = 8,
    grid_rows: int = 12,
    hold: bool = True,
    methods: tuple[str, ...] | None = None,
    on_progress: ProgressCallback | None = None,
    mask_settings: AutoMaskSettings | None = None,
) -> tuple[Report, Image.Image]:
    """Run the eval; returns the report and a grid (source, target, then one column per method).

    With :data:`AUTO_MASK_RUN` among ``methods`` the automatic masks (``mask_settings``, default
    :class:`AutoMaskSettings`) are scored too, and the grid ends with a column that shows them.

    With ``hold``, DDS also runs from the right answer (the target image) on the same cases: the
    figures it ends at bound what DDS can reach with this model and these settings. ``methods``
    picks the recolour runs (every method by default; a subset is quicker when screening a model).
    Each method runs with its own settings, ``editor.config(method, **overrides)``: the model's and the
    method's defaults under ``overrides`` (e.g. ``{"steps": 50}``); the report records them.
    ``on_progress(label, count)`` follows the edits (:func:`edit_count` of them in all).
    """
    runs = eval_runs(editor.family.name)
    methods = methods or runs
    unknown = [method for method in methods if method not in runs]
    if unknown or not methods:
        raise InputError(f"--methods must be some of {', '.join(runs)} on {editor.family.label} models, got "
                         f"{', '.join(methods) or 'none'}")  # fmt: skip
    configs = {}
    for run in (*methods, "dds"):
        method = get_method(MASKED_METHOD if run == AUTO_MASK_RUN else run)
        configs[run] = editor.config(method.name, **method.reads(overrides or {}))
        configs[run].validate(editor.components.num_train_timesteps)
        if problem := method.problem(configs[run], editor.components.num_train_timesteps):
            raise InputError(problem)
    config = configs["dds"]  # the held run and the swaps are DDS's
    cases = recolour_cases(count, seed)
    report = Report(cases=count, seed=seed, settings={k: v for k, v in config.settings().items() if k != "seed"})
    edited_by_method: dict[str, list[Image.Image]] = {}
    auto_masks: list[Image.Image] = []
    for method in methods:
        options = configs[method].options
        report.method_settings[method] = {k: v for k, v in configs[method].settings().items()
                                          if options is not None and k in option_names(options)}  # fmt: skip
        edited, masks = run_edits(editor, cases, method, configs[method], batch_size, on_progress=on_progress,
                                  mask_settings=mask_settings)  # fmt: skip
        scores = [score_edit(c, image, mask) for c, image, mask in zip(cases, edited, masks, strict=True)]
        report.methods[method] = summarise(cases, scores)
        report.intervals[method] = summarise_intervals(cases, scores)
        report.case_scores[method] = case_records(cases, scores)
        edited_by_method[method] = edited
        if method == AUTO_MASK_RUN:
            auto_masks = [mask for mask in masks if mask is not None]
            _score_auto_masks(report, cases, auto_masks, mask_settings or AutoMaskSettings())
    if hold:
        edited, _ = run_edits(
            editor, cases, "dds", config, batch_size, start_at_target=True, on_progress=on_progress, label="dds held"
        )
        scores = [score_edit(c, image) for c, image in zip(cases, edited, strict=True)]
        report.held = summarise(cases, scores)
        report.intervals["held"] = summarise_intervals(cases, scores)
        report.case_scores["held"] = case_records(cases, scores)
    for kind in ("background", "shape"):
        if swaps <= 0:
            break
        kind_cases = swap_cases(swaps, seed, kind)
        edited, _ = run_edits(
            editor, kind_cases, "dds", config, batch_size, on_progress=on_progress, label=f"dds {kind} swap"
        )
        scores = [score_edit(c, image) for c, image in zip(kind_cases, edited, strict=True)]
        right = [s.background_right if kind == "background" else s.shape_right for s in scores]
        report.swaps[kind] = {
            "success_rate": float(np.mean(right)),
            "iou_median": float(statistics.median(s.iou for s in scores)),
            "dots_kept_rate": float(sum(s.dots_kept for s in scores) / max(1, sum(s.dots for s in scores))),
        }
    rows = [
        [render(case.source)[0], render(case.target)[0], *(edited_by_method[m][case.index] for m in methods)]
        for case in cases[:grid_rows]
    ]
    labels = ["source", "target (right answer)", *methods]
    if auto_masks:
        rows = [[*row, _mask_tile(case.source, auto_masks[case.index])] for row, case in zip(rows, cases, strict=False)]
        labels.append("auto mask")
    return report, grid(rows, labels=labels)


def _score_auto_masks(
    report: Report, cases: list[EditCase], masks: list[Image.Image], settings: AutoMaskSettings
) -> None:
    """Add the automatic masks' figures, intervals and per-case scores to ``report``."""
    scores = [score_mask(case.source, mask) for case, mask in zip(cases, masks, strict=True)]
    backgrounds = [case.source.background for case in cases]
    figures = mask_figure_values(backgrounds, scores)
    report.masks = {name: statistic(values) for name, (values, statistic) in figures.items()}
    report.intervals[AUTO_MASK_FIGURES] = {
        name: list(bootstrap_interval(values, statistic)) for name, (values, statistic) in figures.items()
    }
    report.case_scores[AUTO_MASK_FIGURES] = [
        {"index": case.index, "background": background, **asdict(score)}
        for case, background, score in zip(cases, backgrounds, scores, strict=True)
    ]
    report.mask_settings = {key: value for key, value in asdict(settings).items() if key not in ("seed", "chunk_size")}


def _mask_tile(case: ShapeCase, mask: Image.Image) -> Image.Image:
    """The source dimmed outside the mask, with the shape's outline in magenta: what the mask covers, at a glance."""
    source = np.asarray(render(case)[0], dtype=np.float32)
    _, shape, _ = render(case)
    inside = (np.asarray(mask.convert("L")) >= 128)[..., None]
    tile = np.where(inside, source, source * 0.25 + 96)
    outline = shape & ~_erode(shape)
    tile[outline] = (255, 0, 255)
    return Image.fromarray(tile.clip(0, 255).astype(np.uint8))


def _erode(mask: np.ndarray) -> np.ndarray:
    """Shrink a boolean mask by 1 px (the complement of growing its complement)."""
    return ~dilate(~mask, 1)


def _with_interval(value: float, interval: list[float] | None, percent: bool = False) -> str:
    """``0.841 (0.80-0.87)``: a figure and its 95% interval, when there is one."""
    if percent:
        text = f"{value:.0%}"
        return text if interval is None else f"{text} ({interval[0]:.0%}-{interval[1]:.0%})"
    text = f"{value:.3f}"
    return text if interval is None else f"{text} ({interval[0]:.2f}-{interval[1]:.2f})"


def format_report(report: Report) -> str:
    """The report as a plain-text table (also the README's); 95% intervals over cases in brackets."""
    lines = [
        f"shapes eval: {report.cases} recolour cases (seed {report.seed}); 95% bootstrap intervals in brackets",
        "| method | recolour | IoU median (white) | IoU median (black) | background change /255 | dots kept "
        "| outside-mask max change |",
        "|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for method, figures in report.methods.items():
        intervals = report.intervals.get(method, {})
        outside = figures.get("outside_mask_max_change")
        lines.append(
            f"| {method} | {_with_interval(figures['recolour_rate'], intervals.get('recolour_rate'), percent=True)} "
            f"| {_with_interval(figures.get('iou_median_white', nan), intervals.get('iou_median_white'))} "
            f"| {_with_interval(figures.get('iou_median_black', nan), intervals.get('iou_median_black'))} "
            f"| {figures['background_change']:.2f} "
            f"| {figures['dots_kept_rate']:.0%} | {'' if outside is None else f'{outside:.0f}'} |"
        )
    left = {method: f["old_colour_left"] for method, f in report.methods.items() if "old_colour_left" in f}
    if left:
        lines.append(
            "Old colour left (pixels still nearest the source colour, over the source shape's area; mean): "
            + ", ".join(f"{method} {value:.1%}" for method, value in left.items())
        )
    if report.held:
        held, intervals = report.held, report.intervals.get("held", {})
        lines.append(
            "DDS started at the right answer: IoU median "
            f"{_with_interval(held.get('iou_median_white', nan), intervals.get('iou_median_white'))} white, "
            f"{_with_interval(held.get('iou_median_black', nan), intervals.get('iou_median_black'))} black, "
            f"background change {held['background_change']:.2f}, recolour {held['recolour_rate']:.0%}"
        )
    if report.masks:
        masks, intervals = report.masks, report.intervals.get(AUTO_MASK_FIGURES, {})
        settings = ", ".join(
            f"{key} {value}{' px' if key == 'grow' else ''}" for key, value in report.mask_settings.items()
        )
        lines.append(
            f"Automatic mask ({settings}): covers the source shape, median "
            f"{_with_interval(masks['coverage_median_white'], intervals.get('coverage_median_white'), True)} white, "
            f"{_with_interval(masks['coverage_median_black'], intervals.get('coverage_median_black'), True)} black; "
            f"lies within {MASK_MARGIN} px of it, median "
            f"{_with_interval(masks['precision_median_white'], intervals.get('precision_median_white'), True)} white, "
            f"{_with_interval(masks['precision_median_black'], intervals.get('precision_median_black'), True)} black; "
            f"dot pixels inside it {masks['dots_covered']:.1%}"
        )
    for kind, figures in report.swaps.items():
        lines.append(
            f"DDS {kind} swap: success {figures['success_rate']:.0%}, shape IoU median {figures['iou_median']:.3f}, "
            f"dots kept {figures['dots_kept_rate']:.0%}"
        )
    return "\n".join(lines)


REPORT_NAMES = ("report.json", "grid.png")


def write_report(report: Report, picture: Image.Image, out_dir: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``report.json`` and ``grid.png`` into ``out_dir`` atomically; earlier ones only with ``overwrite``."""
    from ddsedit import imageio

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, grid_path = (out_dir / name for name in REPORT_NAMES)
    text = json.dumps(asdict(report), indent=2)
    imageio.atomic_write(json_path, overwrite, lambda handle: handle.write(text.encode("utf-8")))
    imageio.save_image(picture, grid_path, {}, overwrite=overwrite)
    return json_path, grid_path
