"""The worker loop's steps on a real two-process gloo group, as Ray Train sets them up, without Ray."""

from __future__ import annotations

import multiprocessing
import os
import queue

import numpy as np
import torch
import torch.distributed as dist
from conftest import free_ports
from helpers import SMALL_MODEL
from torch.nn.parallel import DistributedDataParallel

from inpaint.config import load_config
from inpaint.masks import MaskConfig, random_masks
from inpaint.models import build_model
from inpaint.train import build_optimizer, sample_picture, train_step

PIXELS = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
INDEX = np.arange(4)


def train_then_draw(rank: int, port: int, through_ddp: bool, results) -> None:
    """One training step on both ranks, then rank 0 alone draws the epoch's picture (as `log_epoch` does)
    while rank 1 goes on to the next collective; rank 0 sends back the picture and its weights."""
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = load_config(None, SMALL_MODEL)
    torch.manual_seed(0)
    module = build_model(cfg.model)  # the fused model: its ConvMixer's BatchNorm buffers are what DDP broadcasts
    model = DistributedDataParallel(module)
    optimizer, scheduler = build_optimizer(module, cfg, steps_per_epoch=1)
    images = torch.rand(4, 3, 32, 32)
    train_step(model, optimizer, scheduler, images, random_masks(4, 32, 32, MaskConfig(), torch.Generator()), cfg)
    model.eval()  # as after validation, whose forward (on every rank) this test leaves out
    if rank == 0:
        picture = sample_picture(model if through_ddp else module, cfg, PIXELS, INDEX)
        results.put((picture, {key: value.numpy().copy() for key, value in module.state_dict().items()}))
    dist.barrier()
    dist.destroy_process_group()


def draw_on_two_ranks(through_ddp: bool, timeout: float = 60) -> tuple[np.ndarray, dict] | None:
    """The picture and weights rank 0 sent, or None if the two ranks did not both finish in time."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_ports(1)[0]
    ranks = [context.Process(target=train_then_draw, args=(rank, port, through_ddp, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        drawn = results.get(timeout=timeout)  # before joining: rank 0 exits only once its picture is taken
    except queue.Empty:
        drawn = None
    for process in ranks:
        process.join(timeout)
    finished = all(process.exitcode == 0 for process in ranks)
    for process in ranks:
        process.kill()
    return drawn if finished else None


def test_rank_0_draws_the_picture_with_the_plain_module_after_a_training_step():
    drawn = draw_on_two_ranks(through_ddp=False)
    assert drawn is not None, "a rank hung or failed"
    picture, weights = drawn
    module = build_model(load_config(None, SMALL_MODEL).model)
    module.load_state_dict({key: torch.from_numpy(value) for key, value in weights.items()})
    np.testing.assert_array_equal(picture, sample_picture(module.eval(), load_config(None, SMALL_MODEL), PIXELS, INDEX))
