"""Datasets: read the formats users have, and prepare them as Parquet shards of raw pixels for training.

Sources (`load_source`):
- CIFAR-10's "python version": the `cifar-10-batches-py` folder, the `cifar-10-python.tar.gz` archive,
  or a folder holding either (torchvision's layout); `download=True` fetches it into an empty folder.
- Parquet in the Hugging Face image layout: column `img` = struct{bytes: encoded PNG/JPEG, path},
  column `label` int64; one file, or a folder of `*.parquet` shards where files named `test*` are
  the test split.

A prepared dataset (`prepare`) is a folder, local or any pyarrow filesystem URI:

    OUT/train/part-00000.parquet ...   image (H*W*3 raw uint8 bytes, HWC), height, width, label, index
    OUT/val/part-00000.parquet ...
    OUT/test/part-00000.parquet ...    only when the source has a test split
    OUT/manifest.json                  written last: its presence marks the dataset complete
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import pickle
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image

from inpaint import storage
from inpaint.errors import UserError
from inpaint.runtime import import_torchvision

Progress = Callable[[str], None]
Splits = dict[str, tuple[np.ndarray, np.ndarray]]  # split name -> (images uint8 (N,H,W,3), labels int64 (N,))

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
DECODE_REPORT_EVERY = 10_000

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_BATCHES = (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)
# What unpickling a damaged file raises (per the pickle docs), then indexing a dict of the wrong shape.
BAD_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    AttributeError,
    EOFError,
    ImportError,
    IndexError,
    KeyError,
    TypeError,
    ValueError,
)

HF_IMAGE_COLUMNS = ("img", "image")  # Hugging Face names it `img` for CIFAR, `image` for most others
HF_LAYOUT = "column `img` = struct{bytes: binary (encoded PNG/JPEG), path: string} and column `label` int64"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Reading sources


def load_source(
    source: str | os.PathLike, *, limit: int | None = None, download: bool = False, progress: Progress = _stderr
) -> Splits:
    """Read a CIFAR-10 or Hugging Face Parquet source into memory: {'train': ..., 'test': ...}.

    `limit` keeps the first `limit` images of each split. The test split is present when the source
    has one. CIFAR-10 batches are Python pickles, and unpickling runs code: only read trusted files.
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive number of images, got {limit}; pass --limit 1 or more")
    path = Path(source)
    if path.is_file():
        if path.name.endswith((".tar.gz", ".tgz", ".tar")):
            splits = _read_cifar_archive(path, limit, progress)
        else:
            splits = {"train": _read_parquet_split("train", [path], limit, progress)}
    elif path.is_dir() or download:
        splits = _read_folder(path, limit, download, progress)
    else:
        raise UserError(
            f"source {path} does not exist; pass a CIFAR-10 folder or archive or a Parquet file or folder, "
            "or a folder with --download to fetch CIFAR-10 into it"
        )
    sizes = {name: images.shape[1:3] for name, (images, _) in splits.items()}
    if len(set(sizes.values())) > 1:
        found = ", ".join(f"{name} {w}x{h}" for name, (h, w) in sizes.items())
        raise UserError(f"the splits of {path} have different image sizes ({found}); resize them to one size")
    return splits


def _read_folder(folder: Path, limit: int | None, download: bool, progress: Progress) -> Splits:
    if (folder / MANIFEST).is_file():
        raise UserError(f"{folder} is already a prepared dataset; pass it to training directly, not to prepare")
    for cifar_folder in (folder, folder / CIFAR_FOLDER):
        if any((cifar_folder / name).is_file() for name in CIFAR_BATCHES):
            return _read_cifar_folder(cifar_folder, limit, progress)
    if (folder / CIFAR_ARCHIVE).is_file():
        return _read_cifar_archive(folder / CIFAR_ARCHIVE, limit, progress)
    parquet_files = sorted(folder.rglob("*.parquet"))
    if parquet_files:
        return _read_parquet_folder(folder, parquet_files, limit, progress)
    if download:
        _download_cifar(folder, progress)
        return _read_cifar_folder(folder / CIFAR_FOLDER, limit, progress)
    raise UserError(
        f"{folder} holds no dataset: expected {CIFAR_FOLDER}/, {CIFAR_ARCHIVE} or *.parquet files; "
        "put one there, or pass --download to fetch CIFAR-10 into it"
    )


def _download_cifar(folder: Path, progress: Progress) -> None:
    progress(f"downloading CIFAR-10 into {folder}")
    try:
        import_torchvision().datasets.CIFAR10(str(folder), train=True, download=True)
    except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), or a corrupt download
        raise UserError(
            f"could not download CIFAR-10 into {folder} ({err}); download {CIFAR_URL} on a machine with "
            f"network access and put {CIFAR_ARCHIVE} in {folder}"
        ) from err


def _read_cifar_folder(folder: Path, limit: int | None, progress: Progress) -> Splits:
    missing = [name for name in CIFAR_BATCHES if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{folder} lacks the CIFAR-10 batches {', '.join(missing)}; re-download {CIFAR_ARCHIVE} and extract it"
        )
    batches = {}
    for name in CIFAR_BATCHES:
        with open(folder / name, "rb") as file:
            batches[name] = _unpickle_cifar(file, str(folder / name))
    return _cifar_splits(batches, limit, str(folder), progress)


def _read_cifar_archive(archive: Path, limit: int | None, progress: Progress) -> Splits:
    batches = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:  # one pass: a .tar.gz can only be read in order
                name = PurePosixPath(member.name).name
                if member.isfile() and name in CIFAR_BATCHES:
                    batches[name] = _unpickle_cifar(tar.extractfile(member), f"{archive}:{member.name}")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"cannot read the archive {archive} ({err}); re-download {CIFAR_URL}") from err
    missing = [name for name in CIFAR_BATCHES if name not in batches]
    if missing:
        raise UserError(f"{archive} lacks the CIFAR-10 batches {', '.join(missing)}; re-download {CIFAR_URL}")
    return _cifar_splits(batches, limit, str(archive), progress)


def _unpickle_cifar(file: IO[bytes], where: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch as (images (N,32,32,3), labels). Unpickling runs code: trusted files only."""
    try:
        batch = pickle.load(file, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except BAD_PICKLE_ERRORS as err:
        raise UserError(f"{where} is not a CIFAR-10 python batch ({err!r}); re-download {CIFAR_URL}") from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise UserError(
            f"{where} holds data of shape {data.shape} and {len(labels)} labels, not (N, 3072) and N; "
            f"re-download {CIFAR_URL}"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # rows are planar CHW -> HWC


def _cifar_splits(
    batches: dict[str, tuple[np.ndarray, np.ndarray]], limit: int | None, where: str, progress: Progress
) -> Splits:
    train = [batches[name] for name in CIFAR_TRAIN_BATCHES]
    splits = {
        "train": (np.concatenate([images for images, _ in train]), np.concatenate([labels for _, labels in train])),
        "test": batches[CIFAR_TEST_BATCH],
    }
    splits = {name: (np.ascontiguousarray(images[:limit]), labels[:limit]) for name, (images, labels) in splits.items()}
    for name, (images, _) in splits.items():
        progress(f"{name}: {len(images)} images read from {where}")
    return splits


def _read_parquet_folder(folder: Path, files: list[Path], limit: int | None, progress: Progress) -> Splits:
    test_files = [file for file in files if file.name.startswith("test")]
    train_files = [file for file in files if not file.name.startswith("test")]
    if not train_files:
        raise UserError(
            f"{folder} has no train split: every *.parquet file in it is named test*; "
            "add the training shards (any other name)"
        )
    splits = {"train": _read_parquet_split("train", train_files, limit, progress)}
    if test_files:
        splits["test"] = _read_parquet_split("test", test_files, limit, progress)
    return splits


def _read_parquet_split(
    split: str, files: list[Path], limit: int | None, progress: Progress
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the images of Hugging Face Parquet files, in order, into (images (N,H,W,3), labels)."""
    opened = [(file, *_open_hf_parquet(file)) for file in files]
    count = sum(parquet.metadata.num_rows for _, parquet, _ in opened)
    count = count if limit is None else min(count, limit)
    if count == 0:
        raise UserError(f"the {split} split ({', '.join(map(str, files))}) has no rows; pass a non-empty dataset")
    images, labels = None, np.empty(count, dtype=np.int64)
    for i, (file, row, blob, label) in enumerate(itertools.islice(_hf_rows(opened), count)):
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
        if (i + 1) % DECODE_REPORT_EVERY == 0 or i + 1 == count:
            progress(f"{split}: {i + 1}/{count} images decoded")
    return images, labels


def _open_hf_parquet(file: Path) -> tuple[pq.ParquetFile, str]:
    """The Parquet file and the name of its image column, checked against the Hugging Face layout."""
    try:
        parquet = pq.ParquetFile(file)
    except pa.ArrowInvalid as err:
        raise UserError(f"{file} is not a Parquet file ({err}); pass a CIFAR-10 or Parquet dataset") from err
    schema = parquet.schema_arrow
    for name in HF_IMAGE_COLUMNS:
        if name in schema.names:
            kind = schema.field(name).type
            if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
                return parquet, name
    raise UserError(f"{file} has no image column (columns: {', '.join(schema.names)}); expected {HF_LAYOUT}")


def _hf_rows(opened: list[tuple[Path, pq.ParquetFile, str]]) -> Iterator[tuple[Path, int, bytes | None, int]]:
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
    if blob is None:
        raise UserError(f"{file} row {row} has no image bytes; remove the row or fill it in")
    try:
        with Image.open(io.BytesIO(blob)) as image:
            if image.mode != "RGB":
                raise UserError(
                    f"{file} row {row} has mode {image.mode}; the project expects RGB images: "
                    "convert them (e.g. Image.convert('RGB')) first"
                )
            return np.asarray(image)
    except (OSError, SyntaxError, ValueError) as err:  # what Pillow raises for unreadable or truncated images
        raise UserError(f"cannot decode the image in {file} row {row} ({err}); fix or remove that row") from err


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
    progress: Progress = _stderr,
) -> dict:
    """Convert `source` into training-ready shards under `out` (a local folder or pyarrow URI); return the manifest.

    `val` images drawn from the source's train split by a seeded permutation form the val split, the rest
    the train split, each in source order. A finished `out` with the same settings is returned as is;
    split folders without a manifest (an interrupted run) are removed and written again.
    """
    storage.check_bucket(out, f"preparing {out}")  # before reading the source: nothing is half-written
    fs, root = _filesystem(out)
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


def _filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a URI (s3://, gs://, file://...); a plain path is local."""
    return storage.filesystem(uri)


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether `path` holds a finished prepared dataset (its manifest is written last)."""
    fs, root = _filesystem(path)
    with storage.errors_explained(path, f"looking for {path}/{MANIFEST}"):
        return fs.get_file_info(f"{root}/{MANIFEST}").type == pafs.FileType.File


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a prepared dataset: format, settings, height, width and rows per split."""
    if not is_prepared(path):
        raise UserError(
            f"{path} is not a prepared dataset (no {MANIFEST}); "
            f"run `python jobs/prepare.py --source SRC --out {path}` first"
        )
    fs, root = _filesystem(path)
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
    fs, root = _filesystem(path)
    # Local shards as plain paths; remote ones under the caller's URI, so scheme and host are kept.
    base = root if isinstance(fs, pafs.LocalFileSystem) else str(path).rstrip("/")
    with storage.errors_explained(path, f"listing {path}/{split}"):
        return [f"{base}/{split}/{name}" for name in _shard_names(fs, f"{root}/{split}")]


def read_split(path: str | os.PathLike, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` (default all) images uint8 (N,H,W,3) of one split and their `index` int64 (N,)."""
    manifest = _check_split(path, split)
    fs, root = _filesystem(path)
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


def to_float_images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 images (N,H,W,3) → float32 (N,3,H,W) in [0,1]: the one place pixels become the model's tensors.

    One pass reorders HWC → CHW and converts to float; `from_numpy` then shares that memory."""
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)).div_(255)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """float (N,3,H,W) in [0,1] → uint8 images (N,H,W,3), rounded: the way back to pictures and files."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def batch_to_tensor(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A numpy batch of prepared rows (as Ray Data gives it) -> images float32 (N,3,H,W) in [0,1], index int64 (N,).

    All rows of a prepared dataset share one size, so the first row's height and width hold for all.
    """
    pixels = _pixels(batch["image"], int(batch["height"][0]), int(batch["width"][0]))
    return to_float_images(pixels), torch.tensor(batch["index"], dtype=torch.int64)  # a copy: Ray's may be read-only
