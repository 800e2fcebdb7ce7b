"""One image to edit, and its preparation: the checks, the loaded source, mask and start, the seed, the working size.

No model is needed here; an automatic mask is only resolved (its settings and seed), the editor draws it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ddsedit import automask, imageio
from ddsedit.automask import AutoMaskSettings
from ddsedit.checks import check_prompts
from ddsedit.errors import InputError
from ddsedit.methods import MASK_NONE, MASK_REQUIRED, Method, method_names
from ddsedit.settings import EditConfig

ImageLike = str | os.PathLike | Image.Image


@dataclass
class EditRequest:
    """One image to edit in a batch: its prompts, its mask (masked-dds; optional for cds, pds, ids), its own seed.

    ``start`` (optional) is the image the optimisation starts from instead of ``image``, e.g. an
    earlier result to continue; ``image`` stays the source that DDS compares against.
    """

    image: ImageLike
    query: str
    ref: str | None = None
    mask: ImageLike | AutoMaskSettings | None = None  # "auto" or AutoMaskSettings: drawn from the prompts
    seed: int | None = None  # None: the config's seed (or a random one)
    start: ImageLike | None = None
    # SHA-256 of the source and mask files, recorded in the output (computed here when they are paths;
    # callers that pass loaded images, like batch, pass the hashes of the files they loaded).
    source_sha256: str | None = None
    mask_sha256: str | None = None


@dataclass
class PreparedRequest:
    """A request after checking: the loaded source, the binary mask (or how to draw it), seed and working size."""

    source: Image.Image
    query: str
    ref: str
    mask: Image.Image | None
    seed: int
    working_size: tuple[int, int]
    start: Image.Image | None = None
    start_label: str | None = None  # what the metadata records as the start: a path, or "image"
    source_sha256: str | None = None
    mask_sha256: str | None = None
    auto_mask: AutoMaskSettings | None = None  # how the mask is drawn, when automatic (its seed set)


def load_rgb(image: ImageLike) -> Image.Image:
    return (image if isinstance(image, Image.Image) else imageio.load_image(image)).convert("RGB")


def check_mask_use(method: Method, has_mask: bool) -> None:
    """A mask where the method needs one, none where it takes none."""
    if method.mask == MASK_REQUIRED and not has_mask:
        raise InputError(f"{method.name} needs a --mask (white = editable)")
    if method.mask == MASK_NONE and has_mask:
        takers = [name for name in method_names() if _takes_mask(name)]
        raise InputError(f"{method.name} takes no mask: use one of {', '.join(takers)}")


def _takes_mask(name: str) -> bool:
    from ddsedit.methods import get_method

    return get_method(name).mask != MASK_NONE


def prepare_request(request: EditRequest, method: Method, config: EditConfig, stride: int) -> PreparedRequest:
    """Check one request and load its images; ``stride`` is the model's latent stride (the working size's step)."""
    check_prompts(method.name, request.query, request.ref or "")
    ref = (request.ref or "") if method.needs_ref else ""
    source = load_rgb(request.image)
    check_mask_use(method, request.mask is not None)
    binary_mask, auto_mask = None, None
    if request.mask is not None:
        auto_mask = automask.requested_settings(request.mask)
        if auto_mask is None:
            mask: Any = request.mask
            if not isinstance(mask, Image.Image):
                mask = imageio.load_image(mask, what="mask", background=imageio.BLACK)
            binary_mask = imageio.binarize_mask(mask, source.size)
    seed = request.seed if request.seed is not None else config.seed
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    if auto_mask is not None and auto_mask.seed is None:
        auto_mask = auto_mask.replace(seed=seed)  # the edit's seed
    start, start_label = None, None
    if isinstance(request.start, Image.Image):
        start, start_label = request.start.convert("RGB"), "image"
    elif request.start is not None:
        start, start_label = imageio.load_image(request.start, "start image"), str(request.start)
    if start is not None:
        imageio.check_start_size(start, source)
    working = imageio.working_size(source.width, source.height, config.size, stride)
    source_sha256 = request.source_sha256
    if source_sha256 is None and not isinstance(request.image, Image.Image):
        source_sha256 = imageio.file_sha256(request.image)
    mask_sha256 = None
    if binary_mask is not None:
        mask_sha256 = request.mask_sha256
        if mask_sha256 is None and not isinstance(request.mask, Image.Image):
            mask_sha256 = imageio.file_sha256(request.mask)
    return PreparedRequest(source, request.query, ref, binary_mask, seed, working, start, start_label, source_sha256,
                           mask_sha256, auto_mask)  # fmt: skip
