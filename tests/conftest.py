"""Shared fixtures: tiny datasets, written to tmp_path in the formats users bring."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def random_split(count: int, height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)
    return images, rng.integers(0, 10, size=count).astype(np.int64)


@pytest.fixture
def cifar_splits() -> Splits:
    """CIFAR-10-shaped arrays: 5 train batches of 4 images, 6 test images, 32x32 HWC."""
    return {"train": random_split(20, 32, 32, seed=1), "test": random_split(6, 32, 32, seed=2)}


@pytest.fixture
def cifar_folder(tmp_path: Path, cifar_splits: Splits) -> Path:
    """`cifar-10-batches-py` as the CIFAR-10 python version lays it out (rows in planar CHW order)."""
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (train_images, train_labels), (test_images, test_labels) = cifar_splits["train"], cifar_splits["test"]
    batches = {
        f"data_batch_{i + 1}": (train_images[4 * i : 4 * i + 4], train_labels[4 * i : 4 * i + 4]) for i in range(5)
    }
    batches["test_batch"] = (test_images, test_labels)
    for name, (images, labels) in batches.items():
        batch = {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), b"labels": labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


@pytest.fixture
def cifar_archive(tmp_path: Path, cifar_folder: Path) -> Path:
    """The same batches as `cifar-10-python.tar.gz`."""
    archive = tmp_path / "archive" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_folder, arcname="cifar-10-batches-py")
    return archive


@pytest.fixture
def write_hf_parquet() -> Callable[..., Path]:
    """Write a Hugging Face image-layout Parquet file; images are arrays or PIL images (saved as PNG) or bytes."""

    def write(path: Path, images: list, labels: list[int] | None = None) -> Path:
        blobs = []
        for image in images:
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            if isinstance(image, Image.Image):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")  # lossless: pixels compare exactly
                image = buffer.getvalue()
            blobs.append(image)
        img = pa.array(
            [{"bytes": blob, "path": None} for blob in blobs],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
        labels = list(range(len(blobs))) if labels is None else labels
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"img": img, "label": pa.array(labels, pa.int64())}), path)
        return path

    return write


@pytest.fixture
def hf_splits() -> Splits:
    """Arrays for the Parquet sources: 6 high, 8 wide, so that a height/width mix-up shows."""
    return {"train": random_split(12, 6, 8, seed=3), "test": random_split(5, 6, 8, seed=4)}


@pytest.fixture
def hf_file(tmp_path: Path, hf_splits: Splits, write_hf_parquet) -> Path:
    """One Parquet file holding the train split."""
    images, labels = hf_splits["train"]
    return write_hf_parquet(tmp_path / "train.parquet", list(images), labels.tolist())


@pytest.fixture
def hf_folder(tmp_path: Path, hf_splits: Splits, write_hf_parquet) -> Path:
    """A folder of shards, as the Hugging Face Hub lays them out: two train shards, one test file, nested."""
    folder = tmp_path / "hf"
    (train_images, train_labels), (test_images, test_labels) = hf_splits["train"], hf_splits["test"]
    write_hf_parquet(
        folder / "data" / "train-00000-of-00002.parquet", list(train_images[:7]), train_labels[:7].tolist()
    )
    write_hf_parquet(
        folder / "data" / "train-00001-of-00002.parquet", list(train_images[7:]), train_labels[7:].tolist()
    )
    write_hf_parquet(folder / "data" / "test-00000-of-00001.parquet", list(test_images), test_labels.tolist())
    return folder
