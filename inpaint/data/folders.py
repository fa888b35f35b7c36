"""Picture sources of any size, for training on crops: a folder of JPEG / PNG / WebP (BMP, GIF, TIFF) files,
local or on object storage (`s3://...`), nested folders allowed, or Parquet in the Hugging Face image layout.

The driver lists the source (`list_pictures`): every picture is a file, or a row of a Parquet file's row group,
and the validation split is a folder of its own (`data.val_path`, or `val/` beside `train/`), else a seeded
share of the pictures. Ray Data then reads them in pieces (`read_pictures`): one row per picture with its encoded
bytes, a name that errors use, its index in its split (which seeds its validation crop and holes), and what is
wrong with it, if anything, found by decoding it once. `keep_usable` says in one line which pictures were left
out (unreadable, or smaller than the crop) and refuses a split with none left, before training starts. The object
store holds the pictures encoded; the workers decode and crop them in their batch path (`crops.py`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from inpaint import storage
from inpaint.data.hf_parquet import IMAGE_COLUMNS, LAYOUT
from inpaint.data.images import decode_image
from inpaint.errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VAL_FOLDERS = ("val", "validation")
Picture = tuple[str, int, int]  # (path, Parquet row group or -1 for a picture file, row in the group)
PIECE_PICTURES = 64  # pictures a read task takes at most


def _files(source: str) -> list[str]:
    """Every file anywhere below `source` (a path or URI, a folder or one file), hidden ones left out, sorted."""
    fs, root = storage.filesystem(source)
    with storage.errors_explained(source, f"listing {source}"):
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"{source} does not exist: pass a folder of pictures or a Parquet file, or fix the path")
        selector = pafs.FileSelector(root, recursive=True)
        infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(selector)
    scheme = str(source)[: str(source).index("://") + 3] if storage.is_uri(source) else ""
    return sorted(scheme + i.path for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith("."))


def holds_picture_files(source: str) -> bool:
    """Whether there are picture files anywhere below `source` (a missing source has none)."""
    try:
        return any(path.lower().endswith(EXTENSIONS) for path in _files(source))
    except UserError:
        return False


def _pictures(source: str) -> list[Picture]:
    """The pictures of `source`: its picture files, else the rows of its Parquet files (from their metadata)."""
    files = _files(source)
    pictures = [path for path in files if path.lower().endswith(EXTENSIONS)]
    parquet = [path for path in files if path.endswith(".parquet")]
    if pictures and parquet:
        raise UserError(f"{source} holds both picture files and Parquet files: point data.path at one kind")
    if pictures or not parquet:
        return [(path, -1, 0) for path in pictures]
    rows = []
    for path in parquet:
        fs, root = storage.filesystem(path)
        with storage.errors_explained(path, f"reading {path}"), fs.open_input_file(root) as file:
            metadata = pq.ParquetFile(file).metadata
        groups = (metadata.row_group(group).num_rows for group in range(metadata.num_row_groups))
        rows += [(path, group, row) for group, count in enumerate(groups) for row in range(count)]
    return rows


def list_pictures(
    source: str, val_path: str, val_share: float, seed: int, limit: int | None
) -> dict[str, list[Picture]]:
    """The train and val pictures of `source`: validation from `val_path`, else from a `val/` (or
    `validation/`) folder in `source`, else a `val_share` of them drawn with `seed`. `limit` keeps the first
    pictures of each split's folder, or of the listing a share is drawn from."""
    pictures = _pictures(source)
    if not pictures:
        raise UserError(
            f"{source} holds no pictures: expected {', '.join(EXTENSIONS)} files (nested folders are fine) "
            f"or Hugging Face Parquet ({LAYOUT})"
        )
    if val_path:
        return {"train": pictures[:limit], "val": _pictures(val_path)[:limit]}
    root = str(source).rstrip("/")
    in_val_folder = [path[len(root) :].strip("/").split("/")[0] in VAL_FOLDERS for path, _, _ in pictures]
    if any(in_val_folder):
        split = {"train": [], "val": []}
        for picture, val in zip(pictures, in_val_folder, strict=True):
            split["val" if val else "train"].append(picture)
        return {name: listed[:limit] for name, listed in split.items()}
    pictures = pictures[:limit]
    if len(pictures) < 2:
        raise UserError(f"{source} holds 1 picture: training and validation need 2 at least")
    count = min(len(pictures) - 1, max(1, round(len(pictures) * val_share)))  # one at least, never all
    is_val = np.zeros(len(pictures), dtype=bool)
    is_val[np.random.default_rng(seed).permutation(len(pictures))[:count]] = True
    return {
        "train": [p for p, val in zip(pictures, is_val, strict=True) if not val],
        "val": [p for p, val in zip(pictures, is_val, strict=True) if val],
    }


def _pieces(pictures: list[Picture]) -> list[dict[str, Any]]:
    """Read tasks' shares: runs of pictures from one file or row group, each picture with its index in the split."""
    pieces, index = [], 0
    for (path, group), run in itertools.groupby(pictures, key=lambda picture: picture[:2]):
        rows = [row for _, _, row in run]
        for start in range(0, len(rows), PIECE_PICTURES):
            chunk = rows[start : start + PIECE_PICTURES]
            pieces.append({"path": path, "row_group": group, "rows": chunk, "first": index})
            index += len(chunk)
    return pieces


def _encoded(path: str, group: int, rows: list[int]) -> list[tuple[bytes | None, str]]:
    """(encoded picture or None, its name) of each of these rows of a file (a picture file: its one row)."""
    fs, root = storage.filesystem(path)
    if group < 0:
        with fs.open_input_stream(root) as file:
            return [(file.read(), path)]
    with fs.open_input_file(root) as file:
        parquet = pq.ParquetFile(file)
        column = next((name for name in IMAGE_COLUMNS if name in parquet.schema_arrow.names), None)
        if column is None:
            raise UserError(f"{path} has no image column: expected {LAYOUT}")
        blobs = parquet.read_row_group(group, columns=[column]).column(column).combine_chunks().field("bytes")
    return [(blobs[row].as_py(), f"{path} row group {group} row {row}") for row in rows]


def read_piece(piece: dict[str, Any], crop: int) -> list[dict[str, Any]]:
    """Ray Data's step from a piece to its pictures: bytes, name, index, and `problem`: "" for a picture that
    decodes and is at least `crop` on its shorter side, "small" for a smaller one, else why it does not decode."""
    try:
        encoded = _encoded(piece["path"], int(piece["row_group"]), list(piece["rows"]))
    except (OSError, UserError) as err:  # the file itself: every picture of the piece is unreadable
        return [
            {"image": b"", "name": piece["path"], "index": piece["first"] + i, "problem": str(err) or repr(err)}
            for i in range(len(piece["rows"]))
        ]
    out = []
    for i, (blob, name) in enumerate(encoded):
        try:
            height, width = decode_image(blob or b"", name).shape[:2]  # decoded whole: a truncated file fails here
            problem = "small" if min(height, width) < crop else ""
        except UserError as err:  # "NAME is not an image this project can read (WHY); use ...": keep WHY
            message = str(err).removeprefix(f"{name} ").split("; ")[0]
            problem = message[message.find("(") + 1 : message.rfind(")")] if "(" in message else message
        out.append({"image": blob or b"", "name": name, "index": piece["first"] + i, "problem": problem})
    return out


def first_usable(pictures: list[Picture], count: int, crop: int, small_pictures: str) -> list[dict[str, Any]]:
    """The first `count` usable pictures' rows (as `read_piece` gives them), read here, not by Ray Data."""
    usable, rows = usable_problems(small_pictures), []
    for piece in _pieces(pictures):
        rows += [row for row in read_piece(piece, crop) if row["problem"] in usable]
        if len(rows) >= count:
            break
    return rows[:count]


def usable_problems(small_pictures: str) -> tuple[str, ...]:
    """The `problem` values of the pictures that train: none, and "small" where they are enlarged."""
    return ("", "small") if small_pictures == "resize" else ("",)


def read_pictures(pictures: list[Picture], crop: int, ray_args: dict[str, Any]) -> ray.data.Dataset:
    """The pictures read and checked by Ray Data tasks (`ray_args`: where they run), materialized encoded."""
    items = ray.data.from_items(_pieces(pictures), override_num_blocks=max(1, len(pictures) // PIECE_PICTURES))
    return items.flat_map(read_piece, fn_kwargs={"crop": crop}, **ray_args).materialize()


def keep_usable(
    dataset: ray.data.Dataset, split: str, crop: int, small_pictures: str, report: Callable[[str], None]
) -> ray.data.Dataset:
    """The pictures of `dataset` to train on: one line naming those left out, and a UserError if none is left."""
    found = dataset.select_columns(["name", "problem"]).take_all()
    unreadable = [f"{row['name']} ({row['problem']})" for row in found if row["problem"] not in ("", "small")]
    small = [row["name"] for row in found if row["problem"] == "small"]
    if unreadable:
        report(
            f"{split}: left out {len(unreadable)} unreadable file(s) of {len(found)}: {', '.join(unreadable[:5])}"
            + (" ..." if len(unreadable) > 5 else "")
        )
    if small:
        what = "enlarged to it" if small_pictures == "resize" else "left out (data.small_pictures=resize keeps them)"
        report(
            f"{split}: {len(small)} picture(s) smaller than the {crop}-px crop, {what}: {', '.join(small[:5])}"
            + (" ..." if len(small) > 5 else "")
        )
    usable = usable_problems(small_pictures)
    if not any(row["problem"] in usable for row in found):
        raise UserError(
            f"no {split} picture can be used ({len(unreadable)} unreadable, {len(small)} smaller than the {crop}-px "
            "crop): check the files, lower data.crop_size, or set data.small_pictures=resize"
        )
    if len(unreadable) + (0 if small_pictures == "resize" else len(small)) == 0:
        return dataset
    return dataset.filter(lambda row: row["problem"] in usable).materialize()


def repeat(dataset: ray.data.Dataset, times: int) -> ray.data.Dataset:
    """Each row `times` times, indices renumbered so that every copy gets crops of its own."""
    if times == 1:
        return dataset

    def copies(row: dict[str, Any]) -> list[dict[str, Any]]:
        return [row | {"index": row["index"] * times + copy} for copy in range(times)]

    return dataset.flat_map(copies).materialize()
