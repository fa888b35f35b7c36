"""The one image decoder (`inpaint.data.decode_image`) and its callers: Parquet rows, the CLI, Serve's form fields."""

import io
import runpy
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inpaint.data import ImageTooLarge, decode_image, read_image
from inpaint.errors import UserError

REPO = Path(__file__).resolve().parents[1]
NOT_AN_IMAGE = r"is not an image this project can read \(.+\); use a JPEG, PNG, WebP, BMP, GIF or TIFF picture$"


def picture(height: int = 30, width: int = 20) -> np.ndarray:
    """A smooth RGB picture (lossy formats keep it close), distinct in every channel."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(np.uint8)


def encode(pixels: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size but holds almost no pixel data (one row's worth of a compressed stream)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64)))


@pytest.mark.parametrize(("fmt", "options"), [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {})])
def test_lossless_formats_decode_to_the_exact_pixels(fmt, options):
    pixels = picture()
    decoded = decode_image(encode(pixels, fmt, **options), "x")
    assert decoded.dtype == np.uint8 and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_formats_decode_close_to_the_picture(fmt):
    pixels = picture()
    decoded = decode_image(encode(pixels, fmt, quality=95), "x")
    assert decoded.shape == (30, 20, 3)
    assert np.abs(decoded.astype(int) - pixels).mean() < 3


def test_grey_and_rgba_pictures_are_converted_to_the_mode_asked_for():
    pixels = picture()
    grey = pixels[..., 0]
    np.testing.assert_array_equal(decode_image(encode(grey, "PNG"), "x", "L"), grey)
    np.testing.assert_array_equal(decode_image(encode(grey, "PNG"), "x"), np.repeat(grey[..., None], 3, -1))
    rgba = np.concatenate([pixels, np.full((30, 20, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(decode_image(encode(rgba, "PNG"), "x"), pixels)  # alpha dropped
    assert decode_image(encode(pixels, "GIF"), "x", "L").shape == (30, 20)


@pytest.mark.parametrize(("mode", "stored"), [("L", picture()[..., 0]), ("RGBA", np.zeros((4, 4, 4), np.uint8))])
def test_without_convert_another_mode_is_refused(mode, stored):
    with pytest.raises(UserError, match=rf"^rows\.parquet row 3 has mode {mode}; the project expects RGB images"):
        decode_image(encode(stored, "PNG"), "rows.parquet row 3", convert=False)


def bad_pictures() -> dict[str, bytes]:
    png, jpeg, webp = (encode(picture(), fmt) for fmt in ("PNG", "JPEG", "WEBP"))
    return {
        "truncated PNG": png[: len(png) // 2],
        "truncated JPEG": jpeg[: len(jpeg) // 2],
        "truncated WebP": webp[: len(webp) // 2],
        "corrupt PNG": png[:100] + bytes(50) + png[150:],
        "text": b"a text file, not a picture\n",
        "empty": b"",
        "a format not read (TGA)": encode(picture(), "TGA"),
    }


@pytest.mark.parametrize("kind", list(bad_pictures()))
def test_a_file_that_is_not_a_picture_is_one_line_naming_it(kind):
    with pytest.raises(UserError, match="^holiday/beach.png " + NOT_AN_IMAGE) as caught:
        decode_image(bad_pictures()[kind], "holiday/beach.png")
    assert "\n" not in str(caught.value) and "BytesIO" not in str(caught.value)
    assert not isinstance(caught.value, ImageTooLarge)


def test_the_pixel_limit_is_checked_before_decoding():
    pixels = encode(picture(30, 20), "PNG")
    assert decode_image(pixels, "x", max_pixels=600).shape == (30, 20, 3)
    with pytest.raises(ImageTooLarge, match=r"^the image field is 20x30, over the limit of 599 pixels; use a smaller"):
        decode_image(pixels, "the image field", max_pixels=599)
    # Decoding the header alone fails as truncated: refusing it as too large shows that nothing was decoded.
    with pytest.raises(UserError, match=r"image file is truncated"):
        decode_image(png_header(4000, 3000), "x")
    with pytest.raises(ImageTooLarge, match=r"is 4000x3000, over the limit of 4194304 pixels"):
        decode_image(png_header(4000, 3000), "x", max_pixels=2048 * 2048)


def test_without_a_limit_pillows_decompression_bomb_guard_holds():
    # 2e9 pixels: over twice Pillow's MAX_IMAGE_PIXELS, where Pillow refuses while reading the header.
    with pytest.raises(ImageTooLarge, match=r"^bomb\.png is too large to decode \(.*decompression bomb.*\); use a"):
        decode_image(png_header(50_000, 40_000), "bomb.png")


def test_read_image_names_the_file(tmp_path):
    np.testing.assert_array_equal(read_image(_write(tmp_path / "in.png", encode(picture(), "PNG"))), picture())
    with pytest.raises(UserError, match=r"notes\.txt " + NOT_AN_IMAGE):
        read_image(_write(tmp_path / "notes.txt", b"not a picture"))
    with pytest.raises(UserError, match=r"^no file .*missing\.png: check the path$"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(UserError, match=r"^cannot read .* \(Is a directory\); pass a JPEG, PNG"):
        read_image(tmp_path)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_the_inpaint_image_job_refuses_a_text_file_in_one_line(tmp_path, capsys):
    main = runpy.run_path(str(REPO / "jobs" / "inpaint_image.py"))["main"]
    image = _write(tmp_path / "notes.txt", b"not a picture")
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "unused", "--image", str(image), "--mask", str(image), "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {image} is not an image this project can read (format not recognised)"), err


def test_serve_answers_a_non_picture_400_and_a_too_large_one_413():
    from inpaint.serve import HTTPError, read_inputs

    mask = encode(np.full((30, 20), 255, np.uint8), "PNG")
    with pytest.raises(HTTPError, match=r"^the image field " + NOT_AN_IMAGE) as caught:
        read_inputs({"image": b"GIF89a but not really", "mask": mask}, max_pixels=10_000)
    assert caught.value.status == 400
    with pytest.raises(HTTPError, match=r"^the image field is 20x30, over the limit of 599 pixels") as caught:
        read_inputs({"image": encode(picture(), "PNG"), "mask": mask}, max_pixels=599)
    assert caught.value.status == 413
    image, hole = read_inputs({"image": encode(picture(), "PNG"), "mask": mask}, max_pixels=600)
    np.testing.assert_array_equal(image, picture())
    assert hole.all()
