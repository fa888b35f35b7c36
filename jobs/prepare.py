"""Prepare a dataset for training: decode a CIFAR-10 or Hugging Face Parquet source into Parquet shards of raw pixels.

python jobs/prepare.py --source /data/cifar10 --out /data/cifar10-prepared
"""

from __future__ import annotations

import argparse
import time

from inpaint.data import prepare
from inpaint.errors import cli_errors
from inpaint.runtime import configure_process

DESCRIPTION = """\
Decode a dataset once into training-ready Parquet shards of raw pixels, split into train/val(/test).

SRC may be:
  - CIFAR-10's python version: the cifar-10-batches-py folder, the cifar-10-python.tar.gz archive,
    or a folder holding either (with --download, an empty folder is filled from the internet);
  - Parquet in the Hugging Face image layout (column img = struct{bytes, path}, column label):
    one file, or a folder of *.parquet shards where files named test* form the test split.

DIR (a local folder or a pyarrow URI such as s3://bucket/prefix) will contain
  train/part-*.parquet, val/part-*.parquet, test/part-*.parquet (when SRC has a test split)
  and manifest.json, written last: it marks the dataset complete.

--val images are drawn from SRC's train split by a permutation seeded with --seed; the split is
the same on every run. A rerun with the same settings is skipped; a DIR left by an interrupted
run (split folders, no manifest.json) is cleared and written again.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, metavar="SRC", help="the dataset to read (see above)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the prepared dataset")
    parser.add_argument("--val", type=int, default=5000, help="validation images (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="keep only the first N images of each source split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: %(default)s)")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 into SRC if it holds no data")
    return parser.parse_args(argv)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_process()
    started = time.perf_counter()
    manifest = prepare(args.source, args.out, val=args.val, limit=args.limit, seed=args.seed, download=args.download)
    rows = ", ".join(f"{split} {count:,}" for split, count in manifest["splits"].items())
    size = f"{manifest['width']}x{manifest['height']}"
    print(f"{args.out}: {rows} rows of {size} images ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
