"""Pictures as pixels: the one decoder of encoded pictures (files, form fields, Parquet rows) into uint8
arrays, and uint8 arrays (N,H,W,3) to the model's float tensors and back."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from inpaint.errors import UserError

# The formats read, by Pillow's names: the ones cameras, browsers and scanners write. Pillow opens dozens
# more (EPS by calling Ghostscript, among others); naming these keeps that surface closed.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
READ = "JPEG, PNG, WebP, BMP, GIF or TIFF"


class ImageTooLarge(UserError):
    """A picture over the pixel limit: a class of its own, so that Serve can answer it 413 rather than 400."""


def decode_image(
    data: bytes, name: str, mode: str = "RGB", *, max_pixels: int | None = None, convert: bool = True
) -> np.ndarray:
    """The picture encoded in `data` as writable uint8 pixels in `mode`: (H,W,3) for "RGB", (H,W) for "L".

    `name` says where the bytes came from (a file, a form field, a Parquet row): errors name it. The size is
    read from the header and checked against `max_pixels` before a pixel is decoded, so that a small file
    that unpacks to a huge picture costs nothing; without `max_pixels`, Pillow's decompression-bomb limit
    holds. `convert=False` refuses a picture stored in another mode instead of converting it, for sources
    whose pixels must be kept exactly. A UserError (ImageTooLarge over the limit) says what is wrong.
    """
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(
                    f"{name} is {width}x{height}, over the limit of {max_pixels} pixels; use a smaller picture"
                )
            if image.mode != mode and not convert:
                raise UserError(
                    f"{name} has mode {image.mode}; the project expects {mode} images: "
                    f"convert them (e.g. Image.convert({mode!r})) first"
                )
            return np.array(image if image.mode == mode else image.convert(mode))
    except Image.DecompressionBombError as err:  # over Pillow's own limit: raised as the header is read
        raise ImageTooLarge(f"{name} is too large to decode ({err}); use a smaller picture") from None
    except (OSError, EOFError, SyntaxError, ValueError) as err:  # Pillow's for unknown, truncated or corrupt data
        why = "format not recognised" if isinstance(err, UnidentifiedImageError) else str(err)
        raise UserError(f"{name} is not an image this project can read ({why}); use a {READ} picture") from None


def read_image(path: str | os.PathLike, mode: str = "RGB") -> np.ndarray:
    """The picture in the file at `path`, decoded by `decode_image`; a missing or unreadable file is a UserError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"no file {path}: check the path") from None
    except OSError as err:  # a folder, no permission
        raise UserError(f"cannot read {path} ({err.strerror}); pass a {READ} file") from None
    return decode_image(data, str(path), mode)


def to_float_images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 images (N,H,W,3) → float32 (N,3,H,W) in [0,1]: the one place pixels become the model's tensors.

    One pass reorders HWC → CHW and converts to float; `from_numpy` then shares that memory."""
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)).div_(255)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """float (N,3,H,W) in [0,1] → uint8 images (N,H,W,3), rounded: the way back to pictures and files."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
