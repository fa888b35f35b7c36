"""Pictures of any size: decoded crops/s per CPU against one training step's images/s, in one run.

A run with `data.crop_size` keeps its pictures encoded in Ray Data; each worker decodes and crops them in its
batch path (`inpaint.train.PictureCrops`, the collate_fn of `iter_torch_batches`, on the worker's own CPU).
Here the encoded pictures of `--photos` are read into memory once, then, for each crop size, in one process at
`--threads` torch and OpenCV threads (a worker's CPU):
- `crop_batch` (decode, random crop and flip of a training epoch) over batches of `--batch` pictures, cycling
  through them with the epoch moving on each pass: decoded crops/s, and CPU ms per crop;
- the same through `PictureCrops`, to the float tensors the step gets;
- one training step (fresh holes, `inpaint.train.train_step`) of `--config` at that crop and batch, with the
  precision and channels_last the recipe resolves to on this CPU;
- with the recipe's `model.prefill` (OpenCV's fill of the holes, part of that step), the prefill alone on the
  decoded crops with the recipe's holes: CPU ms per crop and its share of the step's CPU.
The data path's share of a worker's CPU is the step's images/s over PictureCrops' crops/s: the fraction of the
CPU the decoding needs to keep up with the step (also from CPU time alone: CPU ms per crop over the step's CPU
ms per image, which a loaded machine disturbs less).

python benchmarks/picture_crops.py --photos ../shared/data/bsds500/train --json picture_crops.json
python benchmarks/picture_crops.py --photos DIR --crops 128 --set model.widths=[32,64,128]
python benchmarks/picture_crops.py --quick    # CI: tiny model, a few generated pictures
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from common import REPO, TINY_MODEL, TrainStep, load_average, machine, print_table, write_json
from PIL import Image

from inpaint.config import load_config
from inpaint.data import to_float_images
from inpaint.data.crops import crop_batch
from inpaint.data.folders import EXTENSIONS
from inpaint.masks import apply_holes, random_masks
from inpaint.models.prefill import prefill_holes
from inpaint.train import PictureCrops, training_precision

# the table, as docs/performance.md holds it: rates from wall time, CPU ms from this process's CPU time
COLUMNS = [
    ("crop", "crop", "d"),
    ("crops_per_s_per_cpu", "decoded crops/s (crop_batch)", ",.0f"),
    ("tensors_per_s_per_cpu", "as float tensors (PictureCrops)", ",.0f"),
    ("tensor_cpu_ms", "CPU ms per crop", ".2f"),
    ("step_images_per_s_per_cpu", "training step img/s", ".1f"),
    ("step_cpu_ms_per_image", "step CPU ms per image", ",.1f"),
    ("data_share", "data path's share of the CPU", ".1%"),
    ("data_share_cpu", "share by CPU time", ".1%"),
    ("prefill_cpu_ms", "prefill CPU ms per crop", ".2f"),
    ("prefill_share_cpu", "prefill's share of the step", ".1%"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, help="a folder of pictures (nested allowed)")
    parser.add_argument("--crops", nargs="+", type=int, default=[64, 128, 256], help="crop sizes (px)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "photos.yaml", help="the training recipe")
    parser.add_argument("--batch", type=int, default=16, help="pictures per batch, as a worker's batch")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (a worker's CPUs)")
    parser.add_argument("--seconds", type=float, default=10.0, help="minimum timed seconds per figure")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--quick", action="store_true", help="CI: tiny model, a few generated pictures, short")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.crops, args.batch, args.seconds = [64, 96], 4, 0.3  # the recipe's holes reach 56 px
        args.set = [*TINY_MODEL, *args.set]
    elif args.photos is None:
        parser.error("--photos DIR is required (or --quick)")
    return args


def generated_pictures(folder: Path, count: int = 6, seed: int = 0) -> Path:
    """A few photo-like pictures of mixed sizes and formats (one smaller than a crop, so enlarged)."""
    rng = np.random.default_rng(seed)
    sizes = [(96, 128), (80, 72), (40, 90), (120, 100), (64, 64), (100, 150)]  # (height, width)
    for i in range(count):
        height, width = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, size=(height // 8 + 2, width // 8 + 2, 3)).astype(np.uint8)
        pixels = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        Image.fromarray(pixels).save(folder / f"picture{i}.{('jpg', 'png', 'webp')[i % 3]}")
    return folder


def read_pictures(folder: Path) -> tuple[list[bytes], list[str], list[tuple[int, int]]]:
    """Every picture below `folder`, encoded, as the folder reader hands it to the workers; and their sizes."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not paths:
        raise SystemExit(f"no pictures ({', '.join(EXTENSIONS)}) under {folder}")
    blobs = [p.read_bytes() for p in paths]
    sizes = []
    for path in paths:
        with Image.open(path) as picture:
            sizes.append(picture.size)
    return blobs, [str(p.relative_to(folder)) for p in paths], sizes


def timed(call: Callable[[], int], min_calls: int, min_seconds: float) -> tuple[float, float]:
    """Items per wall second and CPU ms per item (this process, all threads) of `call`, which returns how many
    items it made; after one warm-up call, over at least `min_calls` calls and `min_seconds`."""
    call()
    items, calls = 0, 0
    wall, cpu = time.perf_counter(), time.process_time()
    while calls < min_calls or time.perf_counter() - wall < min_seconds:
        items += call()
        calls += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return items / wall, cpu / items * 1e3


class Batches:
    """Batches of `batch` encoded pictures in order, round and round; the epoch moves on with every pass."""

    def __init__(self, blobs: list[bytes], names: list[str], batch: int):
        self.blobs, self.names, self.batch = blobs, names, batch
        self.start, self.epoch = 0, 0

    def next(self) -> tuple[list[bytes], list[str], list[int], int]:
        if self.start >= len(self.blobs):
            self.start, self.epoch = 0, self.epoch + 1
        index = list(range(self.start, min(self.start + self.batch, len(self.blobs))))
        self.start += self.batch
        return [self.blobs[i] for i in index], [self.names[i] for i in index], index, self.epoch


def measure(args: argparse.Namespace, blobs: list[bytes], names: list[str], crop: int) -> dict[str, Any]:
    cfg = load_config(args.config, [*args.set, f"data.crop_size={crop}", f"train.batch_size={args.batch}"])
    seed = cfg.train.seed
    min_calls = 2 if args.quick else 5

    batches = Batches(blobs, names, args.batch)

    def decode() -> int:
        chunk, chunk_names, index, epoch = batches.next()
        return len(crop_batch(chunk, chunk_names, index, crop, seed, epoch))

    crops_rate, crops_cpu_ms = timed(decode, min_calls, args.seconds)
    print(f"  crop {crop}: crop_batch {crops_rate / args.threads:.0f} crops/s per CPU", flush=True)

    batches = Batches(blobs, names, args.batch)

    def collate() -> int:
        chunk, chunk_names, index, epoch = batches.next()
        ray_batch = {"image": np.array(chunk, dtype=object), "name": np.array(chunk_names), "index": np.array(index)}
        images, _ = PictureCrops(crop, seed, epoch)(ray_batch)
        return len(images)

    tensors_rate, tensors_cpu_ms = timed(collate, min_calls, args.seconds)
    print(f"  crop {crop}: PictureCrops {tensors_rate / args.threads:.0f} crops/s per CPU", flush=True)

    step = TrainStep(cfg, crop, crop)
    x = torch.rand(args.batch, 3, crop, crop)

    def train() -> int:
        step(x)
        return args.batch

    step_rate, step_cpu_ms = timed(train, min_calls if args.quick else 3, args.seconds * 1.5)
    print(f"  crop {crop}: training step {step_rate / args.threads:.1f} img/s per CPU", flush=True)

    chunk, chunk_names, index, epoch = Batches(blobs, names, args.batch).next()
    crops = to_float_images(crop_batch(chunk, chunk_names, index, crop, seed, epoch))
    holes = torch.Generator().manual_seed(seed)

    def prefill() -> int:
        masks = random_masks(len(crops), crop, crop, cfg.masks, holes)
        prefill_holes(apply_holes(crops, masks), masks, cfg.model.prefill)
        return len(crops)

    prefill_cpu_ms = timed(prefill, min_calls, args.seconds / 2)[1] if cfg.model.prefill != "none" else 0.0
    return {
        "crop": crop,
        "crops_per_s_per_cpu": crops_rate / args.threads,
        "crop_cpu_ms": crops_cpu_ms,
        "tensors_per_s_per_cpu": tensors_rate / args.threads,
        "tensor_cpu_ms": tensors_cpu_ms,
        "step_images_per_s_per_cpu": step_rate / args.threads,
        "step_cpu_ms_per_image": step_cpu_ms,
        # the fraction of a worker's CPU the batch path needs to feed the step at its own speed
        "data_share": step_rate / tensors_rate,
        # the same from CPU time alone, which other processes on the cores disturb less than wall time
        "data_share_cpu": tensors_cpu_ms / step_cpu_ms,
        "prefill_cpu_ms": prefill_cpu_ms,
        "prefill_share_cpu": prefill_cpu_ms / step_cpu_ms,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    with tempfile.TemporaryDirectory(prefix="inpaint-picture-crops-") as tmp:
        photos = args.photos or generated_pictures(Path(tmp))
        blobs, names, sizes = read_pictures(photos)
    cfg = load_config(args.config, args.set)
    precision = training_precision(cfg)
    megapixels = float(np.mean([w * h for w, h in sizes]) / 1e6)
    print(
        f"{len(blobs)} pictures, {sum(map(len, blobs)) / 2**20:.1f} MiB encoded, {megapixels:.3f} MP on average; "
        f"{args.threads} thread(s), batch {args.batch}, {precision}, channels_last={cfg.train.channels_last}",
        flush=True,
    )
    load_before = load_average()
    start = time.perf_counter()
    rows = [measure(args, blobs, names, crop) for crop in args.crops]
    seconds = time.perf_counter() - start
    load_after = load_average()

    print_table(
        f"decoded crops against one training step of {args.config.name} (batch {args.batch}, {precision}"
        f"{' + channels_last' if cfg.train.channels_last else ''}), {args.threads} thread(s), per CPU",
        rows,
        COLUMNS,
    )
    print(f"\nmeasured in {seconds:.0f} s; load average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    write_json(
        args.json,
        {
            "benchmark": "picture_crops",
            "quick": args.quick,
            "command": shlex.join(["python", *(sys.argv if argv is None else [sys.argv[0], *argv])]),
            "machine": machine(),
            "threads": args.threads,
            "batch": args.batch,
            "config": str(args.config),
            "overrides": args.set,
            "precision": precision,
            "channels_last": cfg.train.channels_last,
            "pictures": {
                "count": len(blobs),
                "encoded_mib": sum(map(len, blobs)) / 2**20,
                "mean_megapixels": megapixels,
                "formats": sorted({Path(name).suffix.lower() for name in names}),
            },
            "seconds": seconds,
            "load_average": {"before": load_before, "after": load_after},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
