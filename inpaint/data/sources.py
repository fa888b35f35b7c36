"""The sources `load_source` reads, as a table: each kind is one module that finds its own layout.

A kind's `find` looks at a path and returns a reader when the path holds that kind of dataset, else None;
the first kind in `SOURCES` that claims a path reads it. A new kind of source is a module with a `find`
and a row here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inpaint.data import cifar, hf_parquet
from inpaint.errors import UserError

Progress = Callable[[str], None]
Splits = dict[str, tuple[np.ndarray, np.ndarray]]  # split name -> (images uint8 (N,H,W,3), labels int64 (N,))
Reader = Callable[[int | None, Progress], Splits]  # (limit, progress) -> the source's splits


def report(message: str) -> None:
    """The default `Progress`: one line on stderr, flushed, so that a long read shows where it is."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Source:
    """One kind of source: how the errors name it, and how it recognises a path of its kind."""

    what: str  # a path of this kind, as "pass ..." says it
    holds: str  # what a folder of this kind holds, as "expected ..." says it
    find: Callable[[Path], Reader | None]


# In order: a kind earlier in the table claims a path first; Parquet takes any file CIFAR-10 does not.
SOURCES = (
    Source("a CIFAR-10 folder or archive", f"{cifar.FOLDER}/, {cifar.ARCHIVE}", cifar.find),
    Source("a Parquet file or folder", "*.parquet files", hf_parquet.find),
)


def load_source(
    source: str | os.PathLike, *, limit: int | None = None, download: bool = False, progress: Progress = report
) -> Splits:
    """Read a CIFAR-10 or Hugging Face Parquet source into memory: {'train': ..., 'test': ...}.

    `limit` keeps the first `limit` images of each split. The test split is present when the source
    has one. `download=True` fetches CIFAR-10 into a folder that holds no dataset. CIFAR-10 batches are
    Python pickles, and unpickling runs code: only read trusted files.
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive number of images, got {limit}; pass --limit 1 or more")
    path = Path(source)
    if not path.exists() and not download:
        raise UserError(
            f"source {path} does not exist; pass {' or '.join(kind.what for kind in SOURCES)}, "
            "or a folder with --download to fetch CIFAR-10 into it"
        )
    read = next((reader for kind in SOURCES if (reader := kind.find(path)) is not None), None)
    if read is not None:
        splits = read(limit, progress)
    elif download:
        splits = cifar.read_folder(cifar.download(path, progress), limit, progress)
    else:
        raise UserError(
            f"{path} holds no dataset: expected {' or '.join(kind.holds for kind in SOURCES)}; "
            "put one there, or pass --download to fetch CIFAR-10 into it"
        )
    sizes = {name: images.shape[1:3] for name, (images, _) in splits.items()}
    if len(set(sizes.values())) > 1:
        found = ", ".join(f"{name} {w}x{h}" for name, (h, w) in sizes.items())
        raise UserError(f"the splits of {path} have different image sizes ({found}); resize them to one size")
    return splits
