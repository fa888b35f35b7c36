"""The worker loop's steps on a real two-process gloo group, as Ray Train sets them up, without Ray."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from conftest import free_ports
from helpers import SMALL_MODEL
from mlflow import MlflowClient
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from inpaint import tracking
from inpaint.config import load_config
from inpaint.masks import MaskConfig, random_masks
from inpaint.metrics import VAL_METRICS
from inpaint.models import build_model
from inpaint.train import Worker, build_optimizer, log_epoch, sample_picture, train_step

PIXELS = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
INDEX = np.arange(4)
METRICS = {"epoch": 1, "train_loss": 0.1, **dict.fromkeys(VAL_METRICS, 0.5), "val_psnr_hole": 15.0, "images_per_s": 9.0}


def loop_worker(rank: int, run_id: str, tracking_uri: str) -> Worker:
    """A `Worker` as `start_worker` builds it (the fused model: its ConvMixer's BatchNorm buffers are what DDP
    broadcasts), with `model` the DDP wrapper `ray.train.torch.prepare_model` makes of it."""
    cfg = load_config(None, SMALL_MODEL)
    torch.manual_seed(cfg.train.seed)
    module = build_model(cfg.model)
    optimizer, scheduler = build_optimizer(module, cfg, steps_per_epoch=1)
    worker = Worker(cfg, rank, 2, module, module, optimizer, scheduler, run_id, tracking_uri, 32, 32, 1)
    worker.model = DistributedDataParallel(worker.module)
    return worker


def train_then_log(rank: int, port: int, run_id: str, tracking_uri: str, results) -> None:
    """One training step on both ranks, then rank 0 alone logs the epoch (`log_epoch`, which draws its picture)
    while rank 1 goes on to the next collective; rank 0 sends back its weights."""
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    worker = loop_worker(rank, run_id, tracking_uri)
    images, holes = torch.rand(4, 3, 32, 32), random_masks(4, 32, 32, MaskConfig(), torch.Generator())
    train_step(worker.model, worker.optimizer, worker.scheduler, images, holes, worker.cfg)
    worker.module.eval()  # as validation leaves it (its forward, on every rank, this test leaves out)
    if rank == 0:
        log_epoch(worker, 1, METRICS, (PIXELS, INDEX))
        results.put({key: value.numpy().copy() for key, value in worker.module.state_dict().items()})
    dist.barrier()
    dist.destroy_process_group()


def on_two_ranks(run_id: str, tracking_uri: str, timeout: float = 120) -> tuple[dict[str, np.ndarray] | None, list]:
    """The weights rank 0 sent after logging (None if none came in time) and each rank's exit code at the end
    (None: still running, so hung; the ranks are then killed)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_ports(1)[0]
    ranks = [
        context.Process(target=train_then_log, args=(rank, port, run_id, tracking_uri, results)) for rank in (0, 1)
    ]
    for process in ranks:
        process.start()
    weights, deadline = None, time.monotonic() + timeout
    while weights is None and time.monotonic() < deadline and not any(process.exitcode for process in ranks):
        with contextlib.suppress(queue.Empty):
            weights = results.get(timeout=1)  # before joining: rank 0 exits only once its weights are taken
    for process in ranks:
        process.join(max(deadline - time.monotonic(), 1) if weights is not None else 1)
    exit_codes = [process.exitcode for process in ranks]
    for process in ranks:
        process.kill()
    return weights, exit_codes


def test_rank_0_logs_the_epoch_picture_without_a_collective_after_a_training_step(tmp_path: Path):
    """`log_epoch` draws with `worker.delivered`: drawn through the DDP wrapper, a forward after a training
    step starts a buffer broadcast that rank 1 never joins, and both ranks hang."""
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(tracking_uri, "inpaint-test", "worker", {})
    weights, exit_codes = on_two_ranks(run_id, tracking_uri)
    assert weights is not None and exit_codes == [0, 0], f"the ranks' exit codes: {exit_codes} (None: hung)"
    cfg = load_config(None, SMALL_MODEL)
    module = build_model(cfg.model)
    module.load_state_dict({key: torch.from_numpy(value) for key, value in weights.items()})
    client = MlflowClient(tracking_uri)
    with Image.open(client.download_artifacts(run_id, "samples/epoch_001.png", str(tmp_path))) as logged:
        picture = np.array(logged.convert("RGB"))
    np.testing.assert_array_equal(picture, sample_picture(module.eval(), cfg, PIXELS, INDEX))
    assert client.get_run(run_id).data.metrics["val_psnr_hole"] == METRICS["val_psnr_hole"]
