"""CIFAR-10's "python version": the `cifar-10-batches-py` folder, the `cifar-10-python.tar.gz` archive, or a
folder holding either (torchvision's layout); `download` fetches it into a folder.

The batches are Python pickles, and unpickling runs code: only read trusted files.
"""

from __future__ import annotations

import functools
import pickle
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

import numpy as np

from inpaint.errors import UserError
from inpaint.runtime import import_torchvision

if TYPE_CHECKING:  # sources.py imports this module to build its table
    from inpaint.data.sources import Progress, Reader, Splits

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
BATCHES = (*TRAIN_BATCHES, TEST_BATCH)
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


def find(path: Path) -> Reader | None:
    """A reader of `path` if it is a CIFAR-10 archive, batches folder, or a folder holding either."""
    if path.is_file():
        return functools.partial(read_archive, path) if path.name.endswith(ARCHIVE_SUFFIXES) else None
    for folder in (path, path / FOLDER):
        if any((folder / name).is_file() for name in BATCHES):
            return functools.partial(read_folder, folder)
    if (path / ARCHIVE).is_file():
        return functools.partial(read_archive, path / ARCHIVE)
    return None


def download(folder: Path, progress: Progress) -> Path:
    """Fetch CIFAR-10 into `folder` (torchvision's downloader, which checks the archive's MD5); the batches folder."""
    progress(f"downloading CIFAR-10 into {folder}")
    try:
        import_torchvision().datasets.CIFAR10(str(folder), train=True, download=True)
    except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), or a corrupt download
        raise UserError(
            f"could not download CIFAR-10 into {folder} ({err}); download {URL} on a machine with "
            f"network access and put {ARCHIVE} in {folder}"
        ) from err
    return folder / FOLDER


def read_folder(folder: Path, limit: int | None, progress: Progress) -> Splits:
    """The splits of a `cifar-10-batches-py` folder, the first `limit` images of each."""
    missing = [name for name in BATCHES if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{folder} lacks the CIFAR-10 batches {', '.join(missing)}; re-download {ARCHIVE} and extract it"
        )
    batches = {}
    for name in BATCHES:
        with open(folder / name, "rb") as file:
            batches[name] = _unpickle(file, str(folder / name))
    return _splits(batches, limit, str(folder), progress)


def read_archive(archive: Path, limit: int | None, progress: Progress) -> Splits:
    """The splits of `cifar-10-python.tar.gz`, read in one pass without extracting it."""
    batches = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:  # one pass: a .tar.gz can only be read in order
                name = PurePosixPath(member.name).name
                if member.isfile() and name in BATCHES:
                    batches[name] = _unpickle(tar.extractfile(member), f"{archive}:{member.name}")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"cannot read the archive {archive} ({err}); re-download {URL}") from err
    missing = [name for name in BATCHES if name not in batches]
    if missing:
        raise UserError(f"{archive} lacks the CIFAR-10 batches {', '.join(missing)}; re-download {URL}")
    return _splits(batches, limit, str(archive), progress)


def _unpickle(file: IO[bytes], where: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch as (images (N,32,32,3), labels). Unpickling runs code: trusted files only."""
    try:
        batch = pickle.load(file, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except BAD_PICKLE_ERRORS as err:
        raise UserError(f"{where} is not a CIFAR-10 python batch ({err!r}); re-download {URL}") from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise UserError(
            f"{where} holds data of shape {data.shape} and {len(labels)} labels, not (N, 3072) and N; re-download {URL}"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # rows are planar CHW -> HWC


def _splits(
    batches: dict[str, tuple[np.ndarray, np.ndarray]], limit: int | None, where: str, progress: Progress
) -> Splits:
    train = [batches[name] for name in TRAIN_BATCHES]
    splits = {
        "train": (np.concatenate([images for images, _ in train]), np.concatenate([labels for _, labels in train])),
        "test": batches[TEST_BATCH],
    }
    splits = {name: (np.ascontiguousarray(images[:limit]), labels[:limit]) for name, (images, labels) in splits.items()}
    for name, (images, _) in splits.items():
        progress(f"{name}: {len(images)} images read from {where}")
    return splits
