"""The procedural "shapes" world: seeded rendering of one plain shape on a plain background.

Every image is 64x64 RGB and holds exactly one filled shape (a circle, an axis-aligned square or an
upright triangle) of one of four colours, 16-44 px across, fully inside the frame, on a white or
black background. Two details that no caption names are drawn on every background:

* a gentle linear brightness ramp in a random direction, at most +-10 levels from the base colour
  (reached at the frame's extreme corner along the ramp direction), and
* 3-6 grey (128,128,128) dots of radius 2 px, clear of the shape's bounding square and of each other.

Dots are kept clear of the shape's bounding *square*, which holds every shape of that size and place,
so the same case can be rendered with another shape, colour or background (`ShapeCase.edited`) and
stay valid: this is how an edit's "source" and "ideal target" are rendered.

Geometry, with pixel (row, col) centred at (row + 0.5, col + 0.5):

* `size` is the side of the bounding square, whose top-left corner is at integer (x0, y0);
* circle: the disc inscribed in that square;
* square: the square itself (exactly size x size pixels);
* triangle: apex at the top-middle, flat base along the bottom edge (base = height = size).

Captions are exactly ``a {colour} {shape} on a {background} background`` (or ``a {colour} {shape}``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 64
MIN_SIZE = 16
MAX_SIZE = 44
EDGE_MARGIN = 1  # px kept free between the shape's bounding square and the frame
RAMP_MAX = 10.0  # brightness levels at the frame's extreme corner
DOT_GREY = (128, 128, 128)
DOT_RADIUS = 2
DOT_COUNT = (3, 6)  # inclusive
DOT_GAP = 3  # min px of background between a dot's disc and the shape square or another dot

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: dict[str, float] = {
    # name -> fraction of its bounding square that the shape fills (ideal, continuous)
    "circle": math.pi / 4,
    "square": 1.0,
    "triangle": 0.5,
}
WORDS: tuple[str, ...] = ("a", "on", "background", *COLOURS, *SHAPES, *BACKGROUNDS)

Rng = np.random.Generator | random.Random


@dataclass(frozen=True)
class ShapeCase:
    """Everything needed to render one image; rendering is a pure function of this."""

    shape: str
    colour: str
    background: str
    x0: int  # left edge of the bounding square, px
    y0: int  # top edge of the bounding square, px
    size: int  # side of the bounding square, px (16-44)
    ramp_angle: float  # direction in which the background brightens, radians (0 = +x, pi/2 = +y down)
    ramp_strength: float  # levels added at the extreme corner along ramp_angle (0-10)
    dots: tuple[tuple[int, int], ...]  # (col, row) of each grey dot's centre pixel

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) centre of the shape's bounding square in continuous pixel coordinates."""
        return (self.x0 + self.size / 2, self.y0 + self.size / 2)

    def edited(self, shape: str | None = None, colour: str | None = None, background: str | None = None) -> ShapeCase:
        """The same case (place, size, ramp, dots) with another shape, colour and/or background."""
        changes = {"shape": shape, "colour": colour, "background": background}
        changes = {k: v for k, v in changes.items() if v is not None}
        _check_names(changes.get("shape", self.shape), changes.get("colour", self.colour),
                     changes.get("background", self.background))
        return dataclasses.replace(self, **changes)


def _check_names(shape: str, colour: str, background: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {list(COLOURS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {list(BACKGROUNDS)}")


def _numpy_rng(rng: Rng) -> np.random.Generator:
    """A numpy Generator driven by `rng` (a `random.Random` is turned into a seed deterministically)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng.getrandbits(64))


_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5  # pixel centres


def shape_mask(shape: str, x0: int, y0: int, size: int) -> np.ndarray:
    """Boolean (64, 64) mask of a shape whose bounding square has top-left (x0, y0) and side `size`."""
    cx, cy = x0 + size / 2, y0 + size / 2
    in_square = (_XX >= x0) & (_XX < x0 + size) & (_YY >= y0) & (_YY < y0 + size)
    if shape == "square":
        return in_square
    if shape == "circle":
        return (_XX - cx) ** 2 + (_YY - cy) ** 2 <= (size / 2) ** 2
    if shape == "triangle":
        # half-width grows linearly from 0 at the apex (top) to size/2 at the base (bottom)
        return in_square & (np.abs(_XX - cx) <= (_YY - y0) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def dots_mask(dots: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> np.ndarray:
    """Boolean (64, 64) mask of the grey dots (discs of radius DOT_RADIUS around pixel centres)."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for col, row in dots:
        mask |= (_XX - (col + 0.5)) ** 2 + (_YY - (row + 0.5)) ** 2 <= DOT_RADIUS**2
    return mask


def _sample_dots(rng: np.random.Generator, x0: int, y0: int, size: int) -> tuple[tuple[int, int], ...]:
    """3-6 dot centres, inside the frame, clear of the shape square and of each other."""
    n = int(rng.integers(DOT_COUNT[0], DOT_COUNT[1] + 1))
    r, gap = DOT_RADIUS, DOT_GAP
    cols, rows = np.arange(IMAGE_SIZE)[None, :], np.arange(IMAGE_SIZE)[:, None]
    inside = (cols >= r) & (cols < IMAGE_SIZE - r) & (rows >= r) & (rows < IMAGE_SIZE - r)
    near_square = (
        (cols >= x0 - r - gap) & (cols < x0 + size + r + gap) & (rows >= y0 - r - gap) & (rows < y0 + size + r + gap)
    )
    allowed = inside & ~near_square
    dots: list[tuple[int, int]] = []
    for _ in range(n):
        free = np.flatnonzero(allowed)
        if free.size == 0:
            break
        idx = int(free[rng.integers(free.size)])
        row, col = divmod(idx, IMAGE_SIZE)
        dots.append((col, row))
        allowed &= (cols - col) ** 2 + (rows - row) ** 2 > (2 * r + gap) ** 2
    return tuple(dots)


def sample_case(
    rng: Rng, shape: str | None = None, colour: str | None = None, background: str | None = None
) -> ShapeCase:
    """Draw a random case; any of shape, colour, background may be fixed by the caller."""
    g = _numpy_rng(rng)
    # draw every random number whether or not it is fixed, so fixing one does not shift the others
    shape_r = list(SHAPES)[int(g.integers(len(SHAPES)))]
    colour_r = list(COLOURS)[int(g.integers(len(COLOURS)))]
    background_r = list(BACKGROUNDS)[int(g.integers(len(BACKGROUNDS)))]
    size = int(g.integers(MIN_SIZE, MAX_SIZE + 1))
    hi = IMAGE_SIZE - EDGE_MARGIN - size
    x0 = int(g.integers(EDGE_MARGIN, hi + 1))
    y0 = int(g.integers(EDGE_MARGIN, hi + 1))
    ramp_angle = float(g.uniform(0.0, 2 * math.pi))
    ramp_strength = float(g.uniform(0.0, RAMP_MAX))
    dots = _sample_dots(g, x0, y0, size)
    shape, colour, background = shape or shape_r, colour or colour_r, background or background_r
    _check_names(shape, colour, background)
    return ShapeCase(shape, colour, background, x0, y0, size, ramp_angle, ramp_strength, dots)


def ramp(angle: float, strength: float) -> np.ndarray:
    """(64, 64) float brightness offsets: linear along `angle`, +-strength at the extreme corners."""
    dx, dy = math.cos(angle), math.sin(angle)
    half = IMAGE_SIZE / 2
    proj = (_XX - half) * dx + (_YY - half) * dy
    extreme = (half - 0.5) * (abs(dx) + abs(dy))  # largest |proj| over pixel centres
    return (strength * proj / extreme).astype(np.float32)


def render_array(case: ShapeCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 HxWx3 image, bool shape mask, bool dots mask) for a case."""
    _check_names(case.shape, case.colour, case.background)
    bg = np.asarray(BACKGROUNDS[case.background], dtype=np.float32)
    img = bg[None, None, :] + ramp(case.ramp_angle, case.ramp_strength)[:, :, None]
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    dmask = dots_mask(case.dots)
    img[dmask] = DOT_GREY
    mask = shape_mask(case.shape, case.x0, case.y0, case.size)
    img[mask] = COLOURS[case.colour]
    return img, mask, dmask


def render(case: ShapeCase) -> tuple[Image.Image, np.ndarray, list[tuple[int, int]]]:
    """(PIL RGB image, bool (64, 64) shape mask, list of (col, row) dot centre pixels)."""
    img, mask, _ = render_array(case)
    return Image.fromarray(img), mask, list(case.dots)


def make_caption(colour: str, shape: str, background: str | None = None) -> str:
    """``a {colour} {shape}``, followed by `` on a {background} background`` when one is given."""
    text = f"a {colour} {shape}"
    return f"{text} on a {background} background" if background else text


def caption(case: ShapeCase, with_background: bool = True) -> str:
    """The caption of a case: ``a {colour} {shape}[ on a {background} background]``."""
    return make_caption(case.colour, case.shape, case.background if with_background else None)


def all_captions() -> list[str]:
    """Every caption the world can produce, the empty prompt included (37 in all)."""
    out = [""]
    for colour in COLOURS:
        for shape in SHAPES:
            out += [make_caption(colour, shape)] + [make_caption(colour, shape, bg) for bg in BACKGROUNDS]
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render_batch(cases: list[ShapeCase]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (N,3,64,64) in [-1,1], shape masks (N,1,64,64) bool, dot masks (N,1,64,64) bool)."""
    rendered = [render_array(c) for c in cases]
    images = to_tensor(np.stack([r[0] for r in rendered]))
    masks = torch.from_numpy(np.stack([r[1] for r in rendered]))[:, None]
    dots = torch.from_numpy(np.stack([r[2] for r in rendered]))[:, None]
    return images, masks, dots


def sample_batch(
    n: int, rng: Rng, short_caption_prob: float = 0.0, empty_caption_prob: float = 0.0
) -> tuple[torch.Tensor, list[str]]:
    """`n` random images as a float tensor (n, 3, 64, 64) in [-1, 1] and their captions.

    A caption is empty with probability `empty_caption_prob` (classifier-free guidance dropout),
    else without its background with probability `short_caption_prob`, else the full caption.
    """
    g = _numpy_rng(rng)
    cases = [sample_case(g) for _ in range(n)]
    images, _, _ = render_batch(cases)
    captions = []
    for case in cases:
        u = g.random()
        if u < empty_caption_prob:
            captions.append("")
        else:
            captions.append(caption(case, with_background=u >= empty_caption_prob + short_caption_prob))
    return images, captions
