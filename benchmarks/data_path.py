"""Ray Data ingest with no model, against what one training step consumes, in one run.

The ingest is the training path's without the model: `read_parquet` of the prepared train split,
materialized (as `inpaint.driver.read_datasets` does before the workers start), then per epoch a
`streaming_split` shard (what `ray.train.get_dataset_shard` hands a worker) through
`iter_torch_batches` with the project's collate (`ImageBatches`: raw bytes → float images), fresh
holes and the model input. Its images/s and CPU time per image are set against the images/s of one
training step at the same batch and `--threads` (a worker's share of the cores) measured here: the
ingest must never be the bottleneck, and the CPU it takes is CPU the training step does not get.

python benchmarks/data_path.py --json data_path.json
python benchmarks/data_path.py --data data/prepared-cifar10 --batches 32 64
python benchmarks/data_path.py --quick     # CI: tiny model and data
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from common import (
    TINY_MODEL,
    TrainStep,
    load_average,
    machine,
    paper_config,
    print_table,
    synthetic_prepared,
    time_steps,
    write_json,
)

from inpaint.data import read_manifest, split_files
from inpaint.masks import MaskConfig, apply_holes, random_masks
from inpaint.models import model_input
from inpaint.train import ImageBatches


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared dataset (default: synthetic images made here)")
    parser.add_argument("--train-images", type=int, default=20000, help="synthetic training images")
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64, 256], help="batch sizes per worker")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the data per batch size")
    parser.add_argument("--prefetch", type=int, default=2, help="prefetch_batches, as the worker loop uses")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="a worker's threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--quick", action="store_true", help="CI: tiny model and data")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.train_images, args.batches, args.epochs = 512, [16], 2
        args.set = [*TINY_MODEL, *args.set]
    return args


def ingest_epoch(
    shard: ray.data.DataIterator, batch: int, prefetch: int, masks_cfg: MaskConfig, holes: torch.Generator
) -> tuple[int, float, float]:
    """One pass: images, wall seconds and this process's CPU seconds (all its threads)."""
    images_seen, wall, cpu = 0, time.perf_counter(), time.process_time()
    for images, _ in shard.iter_torch_batches(batch_size=batch, collate_fn=ImageBatches(), prefetch_batches=prefetch):
        masks = random_masks(len(images), images.shape[-2], images.shape[-1], masks_cfg, holes)
        model_input(apply_holes(images, masks), masks)
        images_seen += len(images)
    return images_seen, time.perf_counter() - wall, time.process_time() - cpu


def measure(args: argparse.Namespace, dataset: ray.data.Dataset, batch: int, size: int) -> dict[str, Any]:
    cfg = paper_config([*args.set, f"train.batch_size={batch}"])
    (shard,) = dataset.streaming_split(1, equal=True)
    holes = torch.Generator().manual_seed(0)
    passes = [ingest_epoch(shard, batch, args.prefetch, cfg.masks, holes) for _ in range(args.epochs)]
    images = sum(p[0] for p in passes[1:] or passes)
    wall = sum(p[1] for p in passes[1:] or passes)
    cpu = sum(p[2] for p in passes[1:] or passes)
    torch.set_num_threads(args.threads)
    step = TrainStep(cfg, size, size)
    x = torch.rand(batch, 3, size, size)
    train_rate = batch / time_steps(lambda: step(x), warmup=2, min_steps=3, min_seconds=1 if args.quick else 10)
    ingest_rate = images / wall
    return {
        "batch": batch,
        "first_epoch_images_per_s": passes[0][0] / passes[0][1],
        "ingest_images_per_s": ingest_rate,
        "ingest_cpu_ms_per_image": cpu / images * 1e3,
        "train_images_per_s": train_rate,
        "ingest_vs_train": ingest_rate / train_rate,
        # the fraction of a core the ingest needs while the step runs at full speed
        "ingest_cores_at_train_speed": train_rate * cpu / images,
    }


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="inpaint-data-path-") as tmp:
        data = args.data or synthetic_prepared(Path(tmp), args.train_images, 16)
        size = read_manifest(data)["height"]
        load_before = load_average()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        start = time.perf_counter()
        dataset = ray.data.read_parquet(split_files(data, "train")).materialize()
        read_s = time.perf_counter() - start
        count = dataset.count()
        rows = []
        for batch in args.batches:
            rows.append(measure(args, dataset, batch, size))
            print(f"  batch {batch}: ingest {rows[-1]['ingest_images_per_s']:.0f} img/s", flush=True)
        ray.shutdown()
        load_after = load_average()

    print(f"\nread_parquet + materialize: {count} images in {read_s:.2f} s ({count / read_s:.0f} img/s)")
    print_table(
        f"ingest (epochs 2+, prefetch_batches={args.prefetch}) against one training step at {args.threads} threads",
        rows,
        [
            ("batch", "batch", "d"),
            ("first_epoch_images_per_s", "epoch-1 img/s", ".0f"),
            ("ingest_images_per_s", "ingest img/s", ".0f"),
            ("ingest_cpu_ms_per_image", "CPU ms/img", ".3f"),
            ("train_images_per_s", "train img/s", ".1f"),
            ("ingest_vs_train", "ingest/train", ".1f"),
            ("ingest_cores_at_train_speed", "cores taken", ".3f"),
        ],
    )
    print(f"\nload average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    write_json(
        args.json,
        {
            "benchmark": "data_path",
            "quick": args.quick,
            "machine": machine(),
            "threads": args.threads,
            "prefetch_batches": args.prefetch,
            "images": count,
            "read_materialize_s": read_s,
            "read_images_per_s": count / read_s,
            "load_average": {"before": load_before, "after": load_after},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
