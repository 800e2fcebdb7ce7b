"""Read an image of the shapes world back: background, shape colour, shape kind, dots; and compare images.

Pixels are labelled by their nearest palette colour (the four shape colours, the background's base
colour and the dots' grey). These measures serve the VAE report, the generation-sanity check and edit
evaluation alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddsedit.shapes.world import BACKGROUNDS, COLOURS, DOT_GREY, DOT_RADIUS, IMAGE_SIZE, SHAPES, shape_mask

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]


def _nearest(img: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for every pixel of a uint8 HxWx3 image."""
    d = ((img[:, :, None, :].astype(np.float32) - palette[None, None].astype(np.float32)) ** 2).sum(-1)
    return d.argmin(-1)


def estimate_background(img: np.ndarray) -> str:
    """The background whose base colour is nearest to the median of the image's 2-px border."""
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    med = np.median(border.astype(np.float32), axis=0)
    return min(BACKGROUNDS, key=lambda b: float(((np.array(BACKGROUNDS[b]) - med) ** 2).sum()))


def colour_mask(img: np.ndarray, colour: str, background: str) -> np.ndarray:
    """Pixels nearer to `colour` than to the background's base colour and to the dots' grey."""
    palette = np.array([COLOURS[colour], BACKGROUNDS[background], DOT_GREY])
    return _nearest(img, palette) == 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def fit_shape(mask: np.ndarray) -> tuple[str, float]:
    """The shape whose template, fitted to the mask's bounding square, overlaps it best, and that IoU."""
    if mask.sum() < 4:
        return "none", 0.0
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    size = int(max(h, w))
    x0 = int(cols[0]) - (size - int(w)) // 2
    y0 = int(rows[-1]) + 1 - size  # a triangle's base and any shape's bottom edge lie at the bbox bottom
    scores = {s: iou(mask, shape_mask(s, x0, y0, size)) for s in SHAPES}
    best = max(scores, key=scores.__getitem__)
    return best, scores[best]


@dataclass
class Reading:
    """What an image shows, as far as the palette can tell."""

    background: str
    colour: str
    shape: str
    shape_fit: float  # IoU of the mask with the fitted template of `shape`
    mask: np.ndarray  # pixels of the shape colour


def read_image(img: np.ndarray) -> Reading:
    """Background, shape colour (majority of shape-coloured pixels), shape kind and mask of a uint8 image."""
    background = estimate_background(img)
    names = list(COLOURS)
    palette = np.array([*(COLOURS[c] for c in names), BACKGROUNDS[background], DOT_GREY])
    labels = _nearest(img, palette)
    counts = np.bincount(labels.ravel(), minlength=len(palette))[: len(names)]
    colour = names[int(counts.argmax())]
    mask = labels == names.index(colour)
    shape, fit = fit_shape(mask)
    return Reading(background, colour, shape, fit, mask)


def dots_kept(img: np.ndarray, dots: list[tuple[int, int]], tolerance: float = 40.0) -> float:
    """Fraction of dots whose disc pixels stay within `tolerance` levels of grey on average."""
    if not dots:
        return 1.0
    grey = np.array(DOT_GREY, np.float32)
    kept = 0
    for col, row in dots:
        disc = (_XX - col) ** 2 + (_YY - row) ** 2 <= DOT_RADIUS**2
        kept += float(np.abs(img[disc].astype(np.float32) - grey).mean()) <= tolerance
    return kept / len(dots)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a boolean mask by `radius` px (square neighbourhood)."""
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def background_change(a: np.ndarray, b: np.ndarray, keep_out: np.ndarray, margin: int = 3) -> float:
    """Mean absolute difference (levels, 0-255) of two uint8 images outside `keep_out` grown by `margin` px."""
    outside = ~dilate(keep_out, margin)
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32))[outside].mean())
