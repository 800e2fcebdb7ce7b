"""Tests for ddsedit.imageio: loading, sizes, tensors, masks, paste-back and atomic saving."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddsedit import imageio
from ddsedit.errors import InputError

# --------------------------------------------------------------------------- helpers


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def half_mask(width: int, height: int) -> Image.Image:
    """Left half black (keep), right half white (edit)."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 2, 0, width, height))
    return mask


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def rgb16_png(values: list[tuple[int, int, int]]) -> bytes:
    """A one-row 16-bit RGB PNG, written by hand since Pillow cannot create one."""
    header = struct.pack(">IIBBBBB", len(values), 1, 16, 2, 0, 0, 0)
    row = b"\x00" + b"".join(struct.pack(">3H", *v) for v in values)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(row))
        + png_chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- load_image errors


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError, match=f"source image not found: {missing}"):
        imageio.load_image(missing)


def test_what_is_used_in_messages(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="^mask not found"):
        imageio.load_image(tmp_path / "nope.png", what="mask")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="folder"):
        imageio.load_image(tmp_path)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "text.png"
    path.write_bytes(b"hello, this is not a PNG\n" * 10)
    with pytest.raises(InputError, match="not an image"):
        imageio.load_image(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InputError):
        imageio.load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    noise(64, 64).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InputError, match="truncated"):
        imageio.load_image(path)


# --------------------------------------------------------------------------- load_image modes


def test_rgb_round_trip(tmp_path: Path) -> None:
    source = noise(10, 6)
    path = tmp_path / "rgb.png"
    source.save(path)
    loaded = imageio.load_image(str(path))
    assert loaded.mode == "RGB"
    assert np.array_equal(pixels(loaded), pixels(source))


def test_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    noise(40, 20).save(path, exif=exif)
    assert imageio.load_image(path).size == (20, 40)


def test_rgba_composited_over_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (4, 1), (255, 0, 0, 255))
    image.putpixel((1, 0), (255, 0, 0, 0))  # fully transparent
    image.putpixel((2, 0), (0, 0, 0, 128))  # half black
    path = tmp_path / "rgba.png"
    image.save(path)
    loaded = imageio.load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 0, 0)
    assert loaded.getpixel((1, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in loaded.getpixel((2, 0)))


def test_la_composited_over_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.new("LA", (2, 2), (0, 0)).save(path)
    assert imageio.load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_greyscale_and_bilevel(tmp_path: Path) -> None:
    Image.new("L", (3, 3), 77).save(tmp_path / "l.png")
    Image.new("1", (3, 3), 1).save(tmp_path / "one.png")
    assert imageio.load_image(tmp_path / "l.png").getpixel((1, 1)) == (77, 77, 77)
    assert imageio.load_image(tmp_path / "one.png").getpixel((1, 1)) == (255, 255, 255)


def test_palette(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    Image.new("RGB", (3, 3), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    loaded = imageio.load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (10, 200, 30)


def test_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    path = tmp_path / "pt.png"
    image.save(path, transparency=0)
    loaded = imageio.load_image(path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (0, 255, 0)


def test_sixteen_bit_grey(tmp_path: Path) -> None:
    array = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")
    loaded = imageio.load_image(path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert abs(loaded.getpixel((1, 0))[0] - 128) <= 1
    assert loaded.getpixel((2, 0)) == (0, 0, 0)
    assert loaded.getpixel((3, 0)) == (1, 1, 1)


def test_sixteen_bit_rgb(tmp_path: Path) -> None:
    path = tmp_path / "rgb16.png"
    path.write_bytes(rgb16_png([(65535, 32768, 0)]))
    loaded = imageio.load_image(path)
    assert loaded.mode == "RGB"
    red, green, blue = loaded.getpixel((0, 0))
    assert red == 255 and abs(green - 128) <= 1 and blue == 0


def test_cmyk(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(path)
    loaded = imageio.load_image(path)
    assert loaded.mode == "RGB"
    assert all(c >= 250 for c in loaded.getpixel((4, 4)))


# --------------------------------------------------------------------------- working_size


@pytest.mark.parametrize("stride", [8, 4])
@pytest.mark.parametrize(
    ("width", "height"), [(512, 512), (1920, 1080), (1080, 1920), (333, 1000), (4000, 30), (7, 5)]
)
def test_working_size(width: int, height: int, stride: int) -> None:
    new_w, new_h = imageio.working_size(width, height, 512, stride)
    assert new_w % stride == 0 and new_h % stride == 0
    assert new_w >= stride and new_h >= stride
    assert abs(max(new_w, new_h) - 512) <= stride
    scale = 512 / max(width, height)
    # Each side is within half a stride of the exact scaled size (or clamped up to one stride).
    assert abs(new_w - width * scale) <= stride / 2 or new_w == stride
    assert abs(new_h - height * scale) <= stride / 2 or new_h == stride


def test_working_size_exact() -> None:
    assert imageio.working_size(1024, 768, 512, 8) == (512, 384)


def test_working_size_too_small() -> None:
    with pytest.raises(InputError):
        imageio.working_size(100, 100, 4, 8)
    with pytest.raises(InputError):
        imageio.working_size(0, 100, 512, 8)


# --------------------------------------------------------------------------- tensors


def test_tensor_round_trip_exact() -> None:
    image = noise(24, 16)
    tensor = imageio.image_to_tensor(image, (24, 16))
    assert tensor.shape == (1, 3, 16, 24) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(pixels(imageio.tensor_to_image(tensor)), pixels(image))
    assert np.array_equal(pixels(imageio.tensor_to_image(tensor[0])), pixels(image))


def test_image_to_tensor_resizes() -> None:
    tensor = imageio.image_to_tensor(noise(30, 20), (16, 8))
    assert tensor.shape == (1, 3, 8, 16)


def test_tensor_to_image_clamps() -> None:
    tensor = torch.tensor([-3.0, 0.0, 3.0]).view(1, 3, 1, 1)
    assert imageio.tensor_to_image(tensor).getpixel((0, 0)) == (0, 128, 255)


def test_tensor_to_image_bad_shape() -> None:
    with pytest.raises(ValueError):
        imageio.tensor_to_image(torch.zeros(2, 3, 4, 4))


# --------------------------------------------------------------------------- masks


def test_mask_threshold_and_resize(tmp_path: Path) -> None:
    mask = Image.new("L", (10, 5), 100)  # just below the threshold
    mask.paste(200, (5, 0, 10, 5))  # right half above it
    path = tmp_path / "mask.png"
    mask.convert("RGB").save(path)
    loaded = imageio.load_mask(path, (40, 20))
    assert loaded.mode == "L" and loaded.size == (40, 20)
    assert set(np.unique(np.asarray(loaded))) == {0, 255}
    assert loaded.getpixel((2, 10)) == 0 and loaded.getpixel((37, 10)) == 255


def test_mask_transparent_is_not_editable(tmp_path: Path) -> None:
    mask = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    mask.paste((255, 255, 255, 255), (4, 0, 8, 8))
    path = tmp_path / "mask.png"
    mask.save(path)
    loaded = imageio.load_mask(path, (8, 8))
    assert loaded.getpixel((1, 1)) == 0 and loaded.getpixel((6, 1)) == 255


@pytest.mark.parametrize(("value", "message"), [(0, "all black"), (255, "all white")])
def test_mask_uniform_errors(tmp_path: Path, value: int, message: str) -> None:
    path = tmp_path / "mask.png"
    Image.new("L", (8, 8), value).save(path)
    with pytest.raises(InputError, match=message):
        imageio.load_mask(path, (8, 8))


def test_mask_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="^mask not found"):
        imageio.load_mask(tmp_path / "nope.png", (8, 8))


def test_mask_feather(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    half_mask(64, 8).save(path)
    sharp = np.asarray(imageio.load_mask(path, (64, 8)))[4]
    soft = np.asarray(imageio.load_mask(path, (64, 8), feather=3))[4]
    assert set(np.unique(sharp)) == {0, 255}
    assert 0 < soft[31] < 255 and 0 < soft[32] < 255  # the seam is soft
    assert soft[0] == 0 and soft[63] == 255  # far from the seam it is not
    with pytest.raises(InputError):
        imageio.load_mask(path, (64, 8), feather=-1)


def test_mask_to_latent() -> None:
    latent = imageio.mask_to_latent(half_mask(64, 32), (8, 4))
    assert latent.shape == (1, 1, 4, 8) and latent.dtype == torch.float32
    assert torch.all(latent[..., :4] == 0) and torch.all(latent[..., 4:] == 1)
    # A seam inside a latent cell gives a fractional, area-weighted value.
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 2, 8))
    assert imageio.mask_to_latent(mask, (1, 1)).item() == pytest.approx(0.25)


# --------------------------------------------------------------------------- paste_back


@pytest.mark.parametrize("feather", [0.0, 4.0])
def test_paste_back(feather: float) -> None:
    source, edited, mask = noise(64, 32, seed=1), noise(64, 32, seed=2), half_mask(64, 32)
    result = imageio.paste_back(edited, source, mask, feather)
    out, src, edt = pixels(result), pixels(source), pixels(edited)
    assert result.size == source.size and result.mode == "RGB"
    assert np.array_equal(out[:, :32], src[:, :32])  # outside: exactly the source
    assert np.array_equal(out[:, 48:], edt[:, 48:])  # inside, away from the seam: the edit
    if feather:
        assert not np.array_equal(out[:, 32:34], edt[:, 32:34])  # the seam is blended


def test_paste_back_resizes_edited() -> None:
    source, mask = noise(64, 32, seed=1), half_mask(64, 32)
    result = imageio.paste_back(Image.new("RGB", (32, 16), (9, 9, 9)), source, mask, 2.0)
    assert result.size == (64, 32)
    assert np.array_equal(pixels(result)[:, :32], pixels(source)[:, :32])
    assert result.getpixel((60, 16)) == (9, 9, 9)


# --------------------------------------------------------------------------- save_png


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_save_png_and_metadata_round_trip(tmp_path: Path) -> None:
    metadata = {"prompt": "a café on Mars, 東京, ✨", "seed": "42"}
    path = imageio.save_png(noise(8, 8), tmp_path / "out.png", metadata, overwrite=False)
    assert path == tmp_path / "out.png"
    assert imageio.read_metadata(path) == metadata
    assert np.array_equal(pixels(imageio.load_image(path)), pixels(noise(8, 8)))
    assert no_temp_files(tmp_path)


def test_save_png_permissions_follow_umask(tmp_path: Path) -> None:
    path = imageio.save_png(noise(4, 4), tmp_path / "out.png", {}, overwrite=False)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_png_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    path.write_bytes(b"precious")
    with pytest.raises(InputError, match="output exists.*--overwrite"):
        imageio.save_png(noise(4, 4), path, {}, overwrite=False)
    assert path.read_bytes() == b"precious"
    assert no_temp_files(tmp_path)


def test_save_png_no_clobber_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that appears after the check is still not replaced."""
    path = tmp_path / "out.png"
    real_check = imageio.check_output_path

    def check_then_race(p: Path, overwrite: bool) -> Path:
        result = real_check(p, overwrite)
        path.write_bytes(b"appeared")
        return result

    monkeypatch.setattr(imageio, "check_output_path", check_then_race)
    with pytest.raises(InputError, match="output exists"):
        imageio.save_png(noise(4, 4), path, {}, overwrite=False)
    assert path.read_bytes() == b"appeared"
    assert no_temp_files(tmp_path)


def test_save_png_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    path.write_bytes(b"old")
    imageio.save_png(noise(4, 4), path, {"k": "v"}, overwrite=True)
    assert imageio.read_metadata(path) == {"k": "v"}
    assert no_temp_files(tmp_path)


def test_save_png_cleans_up_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = noise(4, 4)

    def broken_save(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(image, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk on fire"):
        imageio.save_png(image, tmp_path / "out.png", {}, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_save_png_os_error_becomes_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = noise(4, 4)

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image, "save", full_disk)
    with pytest.raises(InputError, match="No space left"):
        imageio.save_png(image, tmp_path / "out.png", {}, overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_save_png_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="output folder does not exist"):
        imageio.save_png(noise(4, 4), tmp_path / "nope" / "out.png", {}, overwrite=False)


def test_save_png_parent_is_a_file(tmp_path: Path) -> None:
    # chmod cannot stop root from writing, but a regular file as parent fails for everyone.
    parent = tmp_path / "file.txt"
    parent.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        imageio.save_png(noise(4, 4), parent / "out.png", {}, overwrite=False)


def test_save_png_unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores chmod, so the permission answer is simulated; the message is what is tested.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    with pytest.raises(InputError, match="cannot write to"):
        imageio.check_output_path(locked / "out.png", overwrite=False)


def test_output_path_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        imageio.check_output_path(tmp_path / "dir.png", overwrite=True)


def test_check_output_path_does_not_write(tmp_path: Path) -> None:
    assert imageio.check_output_path(str(tmp_path / "out.png"), overwrite=False) == tmp_path / "out.png"
    assert list(tmp_path.iterdir()) == []


def test_read_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        imageio.read_metadata(tmp_path / "nope.png")


# --------------------------------------------------------------------------- save_gif and paths


def test_save_gif(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), (i * 60, 255 - i * 60, 0)) for i in range(4)]
    path = imageio.save_gif(frames, tmp_path / "anim.gif", duration_ms=50)
    with Image.open(path) as gif:
        assert gif.n_frames == 4
        assert gif.info.get("loop") == 0
    assert no_temp_files(tmp_path)
    with pytest.raises(InputError, match="output exists"):
        imageio.save_gif(frames, path)
    imageio.save_gif(frames[:2], path, overwrite=True)
    with Image.open(path) as gif:
        assert gif.n_frames == 2


def test_default_output_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert imageio.default_output_path("in/cat.photo.jpg", "dds") == tmp_path / "cat.photo.dds.png"
    other = tmp_path / "out"
    assert imageio.default_output_path(Path("/x/cat.png"), "sds", other) == other / "cat.sds.png"
