"""What checkpoints on S3 cost per epoch, against local disk, in one run.

Every epoch a run saves a checkpoint (`state.pt`: the weights, the optimizer's and scheduler's state) and Ray
Train copies its folder to `scaling.storage_path` with pyarrow's `copy_files`, as `ray.train` does it (one thread
for S3 uploads, 64 MiB chunks); a restart or `--resume` copies it back. This times those steps for the default
recipe's checkpoint (or `--set`'s), into a local folder and into an S3 bucket: by default moto's server on this
machine, started with deploy/s3-server.sh (no network in between: the floor of what S3 costs), or with `--uri` a
real store reached through the AWS_* variables (S3, MinIO, GCS's S3 API).

python benchmarks/s3_checkpoints.py --json s3_checkpoints.json
python benchmarks/s3_checkpoints.py --uri s3://BUCKET/bench --json s3_checkpoints.json   # a real store
python benchmarks/s3_checkpoints.py --quick     # CI: tiny model, 2 repetitions
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from common import REPO, TINY_MODEL, load_average, machine, print_table, write_json

from inpaint.checkpoints import CHECKPOINT_FILE, save_checkpoint_state
from inpaint.config import load_config
from inpaint.masks import random_masks
from inpaint.models import build_model
from inpaint.storage import check_bucket, filesystem
from inpaint.train import build_optimizer, train_step

CHUNK = 64 * 1024 * 1024  # what ray.train copies with


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", help="an object store prefix to write to (default: a moto S3 server started here)")
    parser.add_argument("--repeats", type=int, default=10, help="checkpoints saved, copied and read back per storage")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--quick", action="store_true", help="CI: tiny model, 2 repetitions")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.set = 2, [*TINY_MODEL, *args.set]
    return args


def checkpoint_state(overrides: list[str]) -> dict[str, Any]:
    """What a worker saves at the end of an epoch: the weights, and the optimizer's state after a step."""
    cfg = load_config(None, overrides)
    model = build_model(cfg.model)
    optimizer, scheduler = build_optimizer(model, cfg, steps_per_epoch=100)
    images = torch.rand(4, 3, 32, 32)
    masks = random_masks(4, 32, 32, cfg.masks, torch.Generator().manual_seed(0))
    train_step(model, optimizer, scheduler, images, masks, cfg)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": 1,
        "config": cfg.to_dict(),
        "metrics": {},
    }
    if cfg.train.ema_decay > 0:  # the moving average is one more copy of the weights
        state["ema"] = {f"module.{key}": value.clone() for key, value in model.state_dict().items()}
    return state


def time_storage(state: dict[str, Any], uri: str, repeats: int) -> dict[str, float]:
    """Median seconds to save a checkpoint, copy its folder to `uri` as Ray Train does, and read it back."""
    fs, root = filesystem(uri)
    remote = isinstance(fs, pafs.S3FileSystem)
    save, upload, download = [], [], []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as back:
            started = time.perf_counter()
            save_checkpoint_state(folder, state)
            saved = time.perf_counter()
            target = f"{root}/checkpoint_{i:06d}"
            fs.create_dir(target, recursive=True)  # as ray.train does before its copy
            kwargs = {"use_threads": False} if remote else {}  # ray.train's workaround for pyarrow's S3 uploads
            pafs.copy_files(folder, target, destination_filesystem=fs, chunk_size=CHUNK, **kwargs)
            uploaded = time.perf_counter()
            pafs.copy_files(target, back, source_filesystem=fs, chunk_size=CHUNK)
            downloaded = time.perf_counter()
            assert os.path.getsize(f"{back}/{CHECKPOINT_FILE}") == os.path.getsize(f"{folder}/{CHECKPOINT_FILE}")
            save.append(saved - started)
            upload.append(uploaded - saved)
            download.append(downloaded - uploaded)
    fs.delete_dir(root)
    return {
        "save_s": statistics.median(save),
        "upload_s": statistics.median(upload),
        "download_s": statistics.median(download),
        "per_epoch_s": statistics.median(s + u for s, u in zip(save, upload, strict=True)),
    }


class LocalS3:
    """deploy/s3-server.sh in a folder of its own, on a free port; its variables in this process's environment."""

    def __enter__(self) -> str:
        self.folder = tempfile.TemporaryDirectory()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.script("up", "--port", str(port))
        for line in Path(self.folder.name, "s3.env").read_text().splitlines():
            if line.startswith("export "):
                name, value = line.removeprefix("export ").split("=", 1)
                os.environ[name] = value
        return "s3://inpaint/bench"

    def script(self, *args: str) -> None:
        command = [str(REPO / "deploy" / "s3-server.sh"), *args, "--run-dir", self.folder.name]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)

    def __exit__(self, *exc: object) -> None:
        self.script("down")
        self.folder.cleanup()


def main() -> None:
    args = parse_args()
    load_before = load_average()
    print(f"load average before: {load_before:.2f}")
    state = checkpoint_state(args.set)
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint_state(folder, state)
        megabytes = os.path.getsize(f"{folder}/{CHECKPOINT_FILE}") / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as local:
        rows.append({"storage": "local disk", **time_storage(state, f"{local}/bench", args.repeats)})
    if args.uri:
        check_bucket(args.uri, "benchmarking it")
        rows.append(
            {
                "storage": args.uri.split("/")[0] + "//" + args.uri.split("/")[2],
                **time_storage(state, args.uri, args.repeats),
            }
        )
    else:
        with LocalS3() as uri:
            rows.append({"storage": "S3 (moto, this machine)", **time_storage(state, uri, args.repeats)})
    local_cost = rows[0]["per_epoch_s"]
    for row in rows:
        row["extra_per_epoch_s"] = row["per_epoch_s"] - local_cost
        row["upload_mb_s"] = megabytes / row["upload_s"]
    print_table(
        f"checkpoint of {megabytes:.1f} MB, median of {args.repeats}",
        rows,
        [
            ("storage", "storage", ""),
            ("save_s", "save (s)", ".3f"),
            ("upload_s", "copy to storage (s)", ".3f"),
            ("upload_mb_s", "MB/s", ".0f"),
            ("per_epoch_s", "per epoch (s)", ".3f"),
            ("extra_per_epoch_s", "over local (s)", "+.3f"),
            ("download_s", "read back (s)", ".3f"),
        ],
    )
    load_after = load_average()
    print(f"\nload average before {load_before:.2f}, after {load_after:.2f}")
    write_json(
        args.json,
        {
            "benchmark": "s3_checkpoints",
            "quick": args.quick,
            "machine": machine(),
            "overrides": args.set,
            "checkpoint_mb": megabytes,
            "repeats": args.repeats,
            "rows": rows,
            "load_average": {"before": load_before, "after": load_after},
        },
    )


if __name__ == "__main__":
    main()
