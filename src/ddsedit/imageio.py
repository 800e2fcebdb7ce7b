"""Image, mask and tensor input/output for ddsedit.

Everything a user points us at goes through here, so every failure a user can cause
(missing file, not an image, truncated file, unwritable output) becomes one
``InputError`` line instead of a PIL/OSError traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps, PngImagePlugin, UnidentifiedImageError

from ddsedit.errors import InputError
from ddsedit.formats import has_output_suffix, output_suffixes_text

if TYPE_CHECKING:  # torch is imported where tensors are made, so that checking files does not load it
    import torch

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

# Modes that carry an alpha channel; "transparency" in image.info covers tRNS/palette transparency.
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


# --------------------------------------------------------------------------- loading


def load_image(
    path: str | Path, what: str = "source image", *, background: tuple[int, int, int] = WHITE
) -> Image.Image:
    """Load an image file as an 8-bit RGB image, fully decoded and EXIF-oriented.

    Transparent pixels are composited over ``background`` (white by default). 16-bit greyscale
    is scaled (65535 -> 255), not clipped. ``what`` names the file in error messages.

    Raises:
        InputError: the file is missing, a directory, unreadable, not an image, or truncated.
    """
    path = Path(path)
    with _open_image(path, what) as image:
        image = _exif_transpose(image)
        return _to_rgb(image, background)


@contextlib.contextmanager
def _open_image(path: Path, what: str):
    """Open and fully decode ``path``, turning every user-caused failure into InputError."""
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if path.is_dir():
        raise InputError(f"{what} is a folder, not a file: {path}")
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise InputError(f"{what} is not an image file Pillow can read: {path}") from None
    except PermissionError:
        raise InputError(f"cannot read {what} (permission denied): {path}") from None
    except Image.DecompressionBombError:
        raise InputError(f"{what} is too large to load safely: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read {what}: {path} ({exc.strerror or exc})") from None
    with image:
        try:
            # Image.open is lazy; a full decode is the only way to catch truncated data here
            # rather than deep inside the pipeline.
            image.load()
        except Image.DecompressionBombError:
            raise InputError(f"{what} is too large to load safely: {path}") from None
        except (OSError, SyntaxError, ValueError, EOFError):
            raise InputError(f"{what} is truncated or corrupt: {path}") from None
        yield image


def _exif_transpose(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a malformed EXIF block just means no rotation."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, TypeError, KeyError, SyntaxError):
        return image.copy()


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, flattening transparency over ``background``."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> L conversion clips at 255; scale the full 16-bit range instead.
        values = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    if image.mode == "RGB":
        return image.copy()
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, F, ...
    except (ValueError, OSError):
        raise InputError(f"unsupported image mode {image.mode!r}") from None


# --------------------------------------------------------------------------- sizes and tensors


def check_start_size(start: Image.Image, source: Image.Image) -> None:
    """A start image must have the source's size: the optimisation starts from its latents."""
    if start.size != source.size:
        raise InputError(
            f"the start image (--start) is {start.width}x{start.height} but the source (--src) is "
            f"{source.width}x{source.height}: they must be the same size"
        )


def working_size(width: int, height: int, longest_side: int, stride: int) -> tuple[int, int]:
    """Return (w, h) with the longest side about ``longest_side``, same aspect, multiples of ``stride``.

    Each side is rounded to the nearest multiple of ``stride`` and never falls below ``stride``.

    Raises:
        InputError: ``longest_side`` is smaller than ``stride`` or a size is not positive.
    """
    if stride < 1:
        raise InputError(f"stride must be at least 1, got {stride}")
    if longest_side < stride:
        raise InputError(f"working size {longest_side} is smaller than the model's stride {stride}")
    if width < 1 or height < 1:
        raise InputError(f"image size must be positive, got {width}x{height}")
    scale = longest_side / max(width, height)

    def snap(side: int) -> int:
        return max(stride, round(side * scale / stride) * stride)

    return snap(width), snap(height)


def image_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``image`` to ``size`` (w, h) and return a float32 tensor [1, 3, h, w] in [-1, 1]."""
    import torch

    image = image.convert("RGB") if image.mode != "RGB" else image
    if image.size != tuple(size):
        image = image.resize(tuple(size), Image.Resampling.LANCZOS)
    array = np.array(image, dtype=np.uint8)  # copy: torch wants a writable buffer
    tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    return tensor / 127.5 - 1.0


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """Turn a [1, 3, h, w] or [3, h, w] tensor in [-1, 1] into an RGB uint8 image (clamped, rounded)."""
    import torch

    if tensor.dim() == 4:
        if tensor.shape[0] != 1:
            raise ValueError(f"expected a batch of one image, got shape {tuple(tensor.shape)}")
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected [1,3,h,w] or [3,h,w], got shape {tuple(tensor.shape)}")
    pixels = ((tensor.detach().to("cpu", torch.float32).clamp(-1, 1) + 1) * 127.5).round()
    array = pixels.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array)


# --------------------------------------------------------------------------- masks


def load_mask(path: str | Path, size: tuple[int, int], feather: float = 0.0) -> Image.Image:
    """Load an edit mask as mode "L" at ``size`` (the source image's (w, h)); white = editable.

    The mask is read as luminance. Transparent pixels count as black (not editable), so a
    white brush stroke on a transparent layer works. It is resized to ``size``, thresholded at
    128 to {0, 255}, then optionally blurred by ``feather`` pixels.

    Raises:
        InputError: the file cannot be loaded, the mask is all black or all white,
            or ``feather`` is negative.
    """
    if feather < 0:
        raise InputError(f"mask feather must be >= 0, got {feather}")
    grey = load_image(path, what="mask", background=BLACK)
    binary = binarize_mask(grey, size, name=str(path))
    if feather > 0:
        binary = binary.filter(ImageFilter.GaussianBlur(feather))
    return binary


def binarize_mask(mask: Image.Image, size: tuple[int, int], name: str = "mask") -> Image.Image:
    """Resize a mask image to ``size`` (w, h) and threshold its luminance at 128 to {0, 255}.

    Raises:
        InputError: the thresholded mask is all black or all white (``name`` says which mask).
    """
    grey = mask.convert("L")
    if grey.size != tuple(size):
        # Bilinear then threshold gives cleaner edges than nearest when scaling up or down.
        grey = grey.resize(tuple(size), Image.Resampling.BILINEAR)
    binary = grey.point(lambda v: 255 if v >= 128 else 0)
    lo, hi = binary.getextrema()
    if hi == 0:
        raise InputError(f"mask is all black: nothing to edit: {name}")
    if lo == 255:
        raise InputError(f"mask is all white: the whole image would be edited (use dds instead): {name}")
    return binary


def mask_to_latent(mask: Image.Image, latent_size: tuple[int, int]) -> torch.Tensor:
    """Area-average ``mask`` down to ``latent_size`` (w, h): float32 [1, 1, h, w] in [0, 1]."""
    import torch
    import torch.nn.functional as F

    array = np.array(mask.convert("L"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)[None, None]
    width, height = latent_size
    # "area" is an average pool, so a latent cell's weight is the fraction of its pixels that are editable.
    return F.interpolate(tensor, size=(height, width), mode="area").clamp(0, 1)


def paste_back(edited: Image.Image, source: Image.Image, mask: Image.Image, feather: float) -> Image.Image:
    """Composite ``edited`` inside ``mask`` over ``source``, feathering the seam inward only.

    The mask is binarised at 128, blurred by ``feather`` px and multiplied by the binary mask, so
    every pixel outside the mask is exactly the source pixel. ``edited`` and ``mask`` are resized to
    the source size if needed. Pass the un-feathered mask for the sharpest boundary.
    """
    source = source.convert("RGB")
    if edited.size != source.size:
        edited = edited.resize(source.size, Image.Resampling.LANCZOS)
    edited = edited.convert("RGB")
    grey = mask.convert("L")
    if grey.size != source.size:
        grey = grey.resize(source.size, Image.Resampling.NEAREST)
    binary = grey.point(lambda v: 255 if v >= 128 else 0)
    alpha = binary
    if feather > 0:
        alpha = ImageChops.multiply(binary.filter(ImageFilter.GaussianBlur(feather)), binary)
    return Image.composite(edited, source, alpha)


# --------------------------------------------------------------------------- saving


def check_output_path(path: str | Path, overwrite: bool) -> Path:
    """Check that ``path`` can be written, without writing; returns it as a Path.

    Lets the CLI fail before spending time loading a model.

    Raises:
        InputError: the folder is missing, not a folder or not writable, the path is a folder,
            or the file exists and ``overwrite`` is False.
    """
    path = Path(path)
    parent = path.parent
    if not parent.exists():
        raise InputError(f"output folder does not exist: {parent}")
    if not parent.is_dir():
        raise InputError(f"output folder is not a folder: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {parent}")
    if path.is_dir():
        raise InputError(f"output path is a folder: {path}")
    if path.exists() and not overwrite:
        raise InputError(f"output exists: {path} (use --overwrite to replace it)")
    return path


# EXIF tags for JPEG and WebP: UserComment (in the Exif IFD) is where Stable Diffusion web UIs put their
# "parameters" text; ImageDescription carries ddsedit's own JSON.
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_IMAGE_DESCRIPTION = 0x010E
_UNICODE_PREFIX = b"UNICODE\x00"  # EXIF's marker for a UTF-16 UserComment


def check_output_suffix(path: str | Path, flag: str = "output") -> Path:
    """``path`` if its extension names a format ddsedit writes (PNG, JPEG, WebP), else a one-line InputError."""
    path = Path(path)
    if not has_output_suffix(path):
        raise InputError(f"{flag} must end in {output_suffixes_text()} (the format it is written in): {path}")
    return path


def save_image(image: Image.Image, path: str | Path, metadata: dict[str, str], overwrite: bool) -> Path:
    """Write ``image`` atomically in the format its extension names, with ``metadata`` inside.

    PNG: each entry as an iTXt chunk (UTF-8). JPEG (quality 95) and WebP (lossless): the
    ``parameters`` entry as EXIF UserComment and the ``ddsedit`` JSON as EXIF ImageDescription,
    where image browsers and :func:`read_metadata` find them.

    Raises:
        InputError: an extension other than .png, .jpg, .jpeg or .webp; see ``check_output_path``.
    """
    path = check_output_suffix(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_itxt(key, value)  # iTXt is UTF-8; tEXt would mangle non-Latin-1 prompts
        return atomic_write(path, overwrite, lambda f: image.save(f, format="PNG", pnginfo=info))
    exif = Image.Exif()
    if "ddsedit" in metadata:
        exif[_IMAGE_DESCRIPTION] = json_ascii(metadata["ddsedit"])
    if "parameters" in metadata:
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE_PREFIX + metadata["parameters"].encode("utf-16-be")
    rgb = image.convert("RGB")
    if suffix == ".webp":
        return atomic_write(path, overwrite, lambda f: rgb.save(f, format="WEBP", lossless=True, exif=exif))
    return atomic_write(path, overwrite, lambda f: rgb.save(f, format="JPEG", quality=95, exif=exif))


def json_ascii(text: str) -> str:
    """JSON text re-encoded with ASCII escapes: EXIF ASCII fields cannot hold other characters."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=True, sort_keys=True)
    except ValueError:
        return text.encode("ascii", "backslashreplace").decode("ascii")


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, str], overwrite: bool) -> Path:
    """Write ``image`` as PNG atomically, with ``metadata`` as iTXt chunks (Unicode-safe).

    Without ``overwrite`` an existing file is never replaced, even if it appears after the check.

    Raises:
        InputError: see ``check_output_path``; also if the write itself fails.
    """
    if Path(path).suffix.lower() != ".png":
        raise InputError(f"{path} must end in .png")
    return save_image(image, path, metadata, overwrite)


def save_gif(
    frames: list[Image.Image], path: str | Path, duration_ms: int = 80, overwrite: bool = False
) -> Path:
    """Write ``frames`` as a looping animated GIF, atomically like ``save_png``.

    Note: Pillow merges identical consecutive frames into one longer frame.
    """
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    rgb = [frame.convert("RGB") for frame in frames]

    def write(f: BinaryIO) -> None:
        rgb[0].save(f, format="GIF", save_all=True, append_images=rgb[1:], duration=duration_ms, loop=0)

    return atomic_write(path, overwrite, write)


def atomic_write(path: str | Path, overwrite: bool, write: Callable[[BinaryIO], object]) -> Path:
    """Write via a temp file in the target folder, fsync, then move into place; never leave the temp.

    Without ``overwrite`` an existing file is never replaced (InputError), even one that appears meanwhile.
    """
    path = check_output_path(path, overwrite)
    tmp = _create_temp(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def _create_temp(path: Path) -> Path:
    """Create an empty, uniquely named temp file beside ``path``.

    os.open with 0o666 lets the umask decide permissions (mkstemp would force 0600 on the result).
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise InputError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    raise InputError(f"cannot create a temporary file in {path.parent}")


def _link_no_clobber(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist (the temp is removed by the caller)."""
    try:
        os.link(tmp, path)  # fails atomically if path exists: closes the check/replace race
    except FileExistsError:
        raise InputError(f"output exists: {path} (use --overwrite to replace it)") from None
    except OSError:
        # Filesystems without hard links: best effort, with a tiny race window.
        if path.exists():
            raise InputError(f"output exists: {path} (use --overwrite to replace it)") from None
        os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a folder so the rename itself is durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The text an image carries: PNG text chunks as a dict; for JPEG and WebP, what :func:`save_image` wrote
    (``ddsedit``: the JSON, each of its parameters, ``parameters``: the web-UI text). {} when there is none."""
    with _open_image(Path(path), "image") as image:
        found = {str(key): str(value) for key, value in getattr(image, "text", {}).items()}
        if image.format in ("JPEG", "WEBP"):
            exif = image.getexif()
            description = exif.get(_IMAGE_DESCRIPTION)
            if isinstance(description, str) and description:
                found["ddsedit"] = description
                # Each parameter under its own key too, as PNG's text chunks give them.
                with contextlib.suppress(ValueError, AttributeError):
                    found.update({str(key): str(value) for key, value in json.loads(description).items()})
            comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
            if isinstance(comment, bytes) and comment.startswith(_UNICODE_PREFIX):
                found["parameters"] = comment[len(_UNICODE_PREFIX) :].decode("utf-16-be", errors="replace")
        return found


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex: recorded with an edit so that it can be matched to its inputs."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def default_output_path(source: str | Path, method: str, directory: Path | None = None) -> Path:
    """Return ``<directory or cwd>/<source stem>.<method>.png``."""
    base = Path(directory) if directory is not None else Path.cwd()
    return base / f"{Path(source).stem}.{method}.png"
