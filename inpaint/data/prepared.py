"""The prepared dataset: a source decoded once into Parquet shards of raw pixels, and its readers.

A prepared dataset (`prepare`) is a folder, local or any pyarrow filesystem URI:

    OUT/train/part-00000.parquet ...   image (H*W*3 raw uint8 bytes, HWC), height, width, label, index
    OUT/val/part-00000.parquet ...
    OUT/test/part-00000.parquet ...    only when the source has a test split
    OUT/manifest.json                  written last: its presence marks the dataset complete
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from inpaint import storage
from inpaint.data.images import to_float_images
from inpaint.data.sources import Progress, load_source, report
from inpaint.errors import UserError

FORMAT = "inpaint-prepared/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
SHARD_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # raw pixels, HWC uint8
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("label", pa.int64()),
        ("index", pa.int64()),  # position inside the split: seeds each validation image's fixed hole
    ]
)
SHARD_BYTES_MAX = 1 << 30  # Arrow `binary` offsets are int32: keep every shard's pixels well under 2 GiB


# -----------------------------------------------------------------------------
# Preparing: source -> Parquet shards of raw pixels


def prepare(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    val: int = 5000,
    limit: int | None = None,
    seed: int = 0,
    download: bool = False,
    shard_rows: int = 10_000,
    progress: Progress = report,
) -> dict:
    """Convert `source` into training-ready shards under `out` (a local folder or pyarrow URI); return the manifest.

    `val` images drawn from the source's train split by a seeded permutation form the val split, the rest
    the train split, each in source order. A finished `out` with the same settings is returned as is;
    split folders without a manifest (an interrupted run) are removed and written again.
    """
    storage.check_bucket(out, f"preparing {out}")  # before reading the source: nothing is half-written
    fs, root = storage.filesystem(out)
    # The absolute path, so that the same source named from another folder is recognised as the same.
    settings = {"source": str(Path(source).resolve()), "seed": seed, "val": val, "limit": limit}
    if is_prepared(out):
        manifest = read_manifest(out)
        recorded = {**manifest, "source": str(Path(manifest.get("source", "")).resolve())}
        changed = [
            f"{key} {recorded.get(key)!r} (now {value!r})"
            for key, value in settings.items()
            if recorded.get(key) != value
        ]
        if changed:
            raise UserError(
                f"{out} already holds a dataset prepared with other settings: {', '.join(changed)}; "
                f"choose another --out or delete {out}"
            )
        rows = ", ".join(f"{split} {count:,}" for split, count in manifest["splits"].items())
        progress(f"{out} is already prepared ({rows}); nothing to do")
        return manifest
    if val < 0:
        raise UserError(f"val must be 0 or more images, got {val}; pass --val 0 or more")

    if (Path(source) / MANIFEST).is_file():
        raise UserError(f"{source} is already a prepared dataset; pass it to training directly, not to prepare")
    splits = load_source(source, limit=limit, download=download, progress=progress)
    train_images, train_labels = splits.pop("train")
    if val >= len(train_images):
        raise UserError(
            f"--val {val} leaves no training images: {source} has {len(train_images)} train images"
            f"{'' if limit is None else f' with --limit {limit}'}; choose a smaller --val"
        )
    is_val = np.zeros(len(train_images), dtype=bool)
    is_val[np.random.default_rng(seed).permutation(len(train_images))[:val]] = True
    # Boolean masks keep source order inside each split.
    outputs = {
        "train": (train_images[~is_val], train_labels[~is_val]),
        "val": (train_images[is_val], train_labels[is_val]),
        **splits,
    }

    # A store failing from here on leaves no manifest, so the next run clears what was written and redoes it.
    with storage.errors_explained(out, f"writing {out} (unfinished: no {MANIFEST}, the next run redoes it)"):
        for split in SPLITS:  # leftovers of an interrupted run: no manifest, so nothing in them is trusted
            if fs.get_file_info(f"{root}/{split}").type != pafs.FileType.NotFound:
                progress(f"removing {split}/ left by an interrupted run")
                fs.delete_dir(f"{root}/{split}")
        for split, (images, labels) in outputs.items():
            _write_split(fs, f"{root}/{split}", split, images, labels, shard_rows, progress)

    height, width = train_images.shape[1:3]
    manifest = {
        "format": FORMAT,
        **settings,
        "height": int(height),
        "width": int(width),
        "splits": {split: len(images) for split, (images, _) in outputs.items()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with storage.errors_explained(out, f"writing {out} (unfinished: no {MANIFEST}, the next run redoes it)"):
        _write_atomically(fs, f"{root}/{MANIFEST}", lambda file: file.write(json.dumps(manifest, indent=2).encode()))
    return manifest


def _write_split(
    fs: pafs.FileSystem,
    folder: str,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    shard_rows: int,
    progress: Progress,
) -> None:
    count, height, width, _ = images.shape
    rows_per_shard = max(1, min(shard_rows, SHARD_BYTES_MAX // (height * width * 3)))
    fs.create_dir(folder, recursive=True)
    for shard, start in enumerate(range(0, max(count, 1), rows_per_shard)):  # an empty split gets one empty shard
        stop = min(start + rows_per_shard, count)
        table = _shard_table(images[start:stop], labels[start:stop], np.arange(start, stop))
        name = f"part-{shard:05d}.parquet"
        # Pixels are all distinct: dictionary-encoding them would only slow writes and reads.
        write = functools.partial(pq.write_table, table, use_dictionary=["height", "width", "label"])
        _write_atomically(fs, f"{folder}/{name}", write)
        progress(f"{split}: {stop}/{count} images written ({name})")


def _shard_table(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> pa.Table:
    count, height, width, _ = images.shape
    # One Arrow binary array straight over the pixel buffer: no Python bytes object per image.
    offsets = np.arange(count + 1, dtype=np.int32) * (height * width * 3)
    pixels = pa.Array.from_buffers(
        pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(images))]
    )
    columns = [
        pixels,
        pa.array(np.full(count, height, dtype=np.int32)),
        pa.array(np.full(count, width, dtype=np.int32)),
        pa.array(labels, type=pa.int64()),
        pa.array(index, type=pa.int64()),
    ]
    return pa.Table.from_arrays(columns, schema=SHARD_SCHEMA)


def _write_atomically(fs: pafs.FileSystem, path: str, write: Callable[[IO[bytes]], object]) -> None:
    """Write under a temporary name, then move into place: a partial file never looks complete."""
    temporary = f"{path}.tmp"
    with fs.open_output_stream(temporary) as file:
        write(file)
    fs.move(temporary, path)


# -----------------------------------------------------------------------------
# Reading a prepared dataset


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether `path` holds a finished prepared dataset (its manifest is written last)."""
    fs, root = storage.filesystem(path)
    with storage.errors_explained(path, f"looking for {path}/{MANIFEST}"):
        return fs.get_file_info(f"{root}/{MANIFEST}").type == pafs.FileType.File


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a prepared dataset: format, settings, height, width and rows per split."""
    if not is_prepared(path):
        raise UserError(
            f"{path} is not a prepared dataset (no {MANIFEST}); "
            f"run `python jobs/prepare.py --source SRC --out {path}` first"
        )
    fs, root = storage.filesystem(path)
    with (
        storage.errors_explained(path, f"reading {path}/{MANIFEST}"),
        fs.open_input_stream(f"{root}/{MANIFEST}") as file,
    ):
        manifest = json.loads(file.read())
    if manifest.get("format") != FORMAT:
        raise UserError(
            f"{path} holds a dataset of format {manifest.get('format')!r}, not {FORMAT!r}; "
            "prepare it again into a new --out"
        )
    return manifest


def split_files(path: str | os.PathLike, split: str) -> list[str]:
    """The shard paths (or URIs) of one split of a prepared dataset, in order: for `ray.data.read_parquet`."""
    _check_split(path, split)
    fs, root = storage.filesystem(path)
    # Local shards as plain paths; remote ones under the caller's URI, so scheme and host are kept.
    base = root if isinstance(fs, pafs.LocalFileSystem) else str(path).rstrip("/")
    with storage.errors_explained(path, f"listing {path}/{split}"):
        return [f"{base}/{split}/{name}" for name in _shard_names(fs, f"{root}/{split}")]


def read_split(path: str | os.PathLike, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` (default all) images uint8 (N,H,W,3) of one split and their `index` int64 (N,)."""
    manifest = _check_split(path, split)
    fs, root = storage.filesystem(path)
    tables = []
    with storage.errors_explained(path, f"reading {path}/{split}"):
        for name in _shard_names(fs, f"{root}/{split}"):
            tables.append(pq.read_table(f"{root}/{split}/{name}", filesystem=fs, columns=["image", "index"]))
            if limit is not None and sum(map(len, tables)) >= limit:
                break
    table = pa.concat_tables(tables).slice(0, limit)
    images = _pixels(table.column("image").to_pylist(), manifest["height"], manifest["width"])
    # Copies: writable arrays that own their memory (Arrow's and bytes' buffers are read-only).
    return images.copy(), table.column("index").to_numpy().copy()


def _check_split(path: str | os.PathLike, split: str) -> dict:
    manifest = read_manifest(path)
    if split not in manifest["splits"]:
        raise UserError(f"{path} has no {split} split (it has {', '.join(manifest['splits'])}); pick one of those")
    return manifest


def _shard_names(fs: pafs.FileSystem, folder: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(folder))
    return sorted(info.base_name for info in infos if info.base_name.endswith(".parquet"))


def _pixels(blobs: Iterable[bytes], height: int, width: int) -> np.ndarray:
    """Raw HWC pixel rows -> one read-only uint8 array (N,H,W,3): a single join, no per-image arrays."""
    return np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(-1, height, width, 3)


def batch_to_tensor(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A numpy batch of prepared rows (as Ray Data gives it) -> images float32 (N,3,H,W) in [0,1], index int64 (N,).

    All rows of a prepared dataset share one size, so the first row's height and width hold for all.
    """
    pixels = _pixels(batch["image"], int(batch["height"][0]), int(batch["width"][0]))
    return to_float_images(pixels), torch.tensor(batch["index"], dtype=torch.int64)  # a copy: Ray's may be read-only
