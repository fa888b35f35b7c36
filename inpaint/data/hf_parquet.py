"""Parquet in the Hugging Face image layout: column `img` (or `image`) = struct{bytes: an encoded picture, path},
column `label` int64; one file, or a folder of `*.parquet` shards where files named `test*` are the test split.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from inpaint.data.images import decode_image
from inpaint.errors import UserError

if TYPE_CHECKING:  # sources.py imports this module to build its table
    from inpaint.data.sources import Progress, Reader, Splits

IMAGE_COLUMNS = ("img", "image")  # Hugging Face names it `img` for CIFAR, `image` for most others
LAYOUT = "column `img` = struct{bytes: binary (encoded PNG/JPEG), path: string} and column `label` int64"
REPORT_EVERY = 10_000  # images decoded between two progress lines


def find(path: Path) -> Reader | None:
    """A reader of `path` if it is a file (read as Parquet, so a wrong file is named as not Parquet) or a
    folder with `*.parquet` files anywhere below it."""
    if path.is_file():
        return lambda limit, progress: {"train": read_split("train", [path], limit, progress)}
    files = sorted(path.rglob("*.parquet"))
    return functools.partial(read_folder, path, files) if files else None


def read_folder(folder: Path, files: list[Path], limit: int | None, progress: Progress) -> Splits:
    """The train split from the `files` not named `test*`, and the test split from those that are."""
    test_files = [file for file in files if file.name.startswith("test")]
    train_files = [file for file in files if not file.name.startswith("test")]
    if not train_files:
        raise UserError(
            f"{folder} has no train split: every *.parquet file in it is named test*; "
            "add the training shards (any other name)"
        )
    splits = {"train": read_split("train", train_files, limit, progress)}
    if test_files:
        splits["test"] = read_split("test", test_files, limit, progress)
    return splits


def read_split(split: str, files: list[Path], limit: int | None, progress: Progress) -> tuple[np.ndarray, np.ndarray]:
    """Decode the images of Hugging Face Parquet files, in order, into (images (N,H,W,3), labels)."""
    opened = [(file, *_open(file)) for file in files]
    count = sum(parquet.metadata.num_rows for _, parquet, _ in opened)
    count = count if limit is None else min(count, limit)
    if count == 0:
        raise UserError(f"the {split} split ({', '.join(map(str, files))}) has no rows; pass a non-empty dataset")
    images, labels = None, np.empty(count, dtype=np.int64)
    for i, (file, row, blob, label) in enumerate(itertools.islice(_rows(opened), count)):
        image = _decode_image(blob, file, row)
        if images is None:
            images = np.empty((count, *image.shape), dtype=np.uint8)  # size from the first image
        elif image.shape != images.shape[1:]:
            (height, width), (want_height, want_width) = image.shape[:2], images.shape[1:3]
            raise UserError(
                f"{file} row {row} is {width}x{height} but the images before it are {want_width}x{want_height}; "
                "all images must have one size: resize them first"
            )
        images[i], labels[i] = image, label
        if (i + 1) % REPORT_EVERY == 0 or i + 1 == count:
            progress(f"{split}: {i + 1}/{count} images decoded")
    return images, labels


def _open(file: Path) -> tuple[pq.ParquetFile, str]:
    """The Parquet file and the name of its image column, checked against the Hugging Face layout."""
    try:
        parquet = pq.ParquetFile(file)
    except pa.ArrowInvalid as err:
        raise UserError(f"{file} is not a Parquet file ({err}); pass a CIFAR-10 or Parquet dataset") from err
    schema = parquet.schema_arrow
    for name in IMAGE_COLUMNS:
        if name in schema.names:
            kind = schema.field(name).type
            if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
                return parquet, name
    raise UserError(f"{file} has no image column (columns: {', '.join(schema.names)}); expected {LAYOUT}")


def _rows(opened: list[tuple[Path, pq.ParquetFile, str]]) -> Iterator[tuple[Path, int, bytes | None, int]]:
    """(file, row, encoded image, label) for every row of the files, reading them in record batches."""
    for file, parquet, image_column in opened:
        has_label = "label" in parquet.schema_arrow.names
        columns = [image_column, "label"] if has_label else [image_column]
        row = 0
        for batch in parquet.iter_batches(batch_size=4096, columns=columns):
            images = batch.column(image_column)
            blobs = images.flatten()[
                images.type.get_field_index("bytes")
            ].to_pylist()  # flatten: null structs give null blobs
            # Inpainting needs no labels: sources without them get -1.
            labels = (
                batch.column("label").cast(pa.int64()).fill_null(-1).to_pylist() if has_label else [-1] * len(blobs)
            )
            for blob, label in zip(blobs, labels, strict=True):
                yield file, row, blob, label
                row += 1


def _decode_image(blob: bytes | None, file: Path, row: int) -> np.ndarray:
    """One row's picture, refused unless RGB: a prepared dataset keeps the source's pixels exactly."""
    if blob is None:
        raise UserError(f"{file} row {row} has no image bytes; remove the row or fill it in")
    return decode_image(blob, f"{file} row {row}", "RGB", convert=False)
