"""Data-parallel training with Ray Train: the loop each worker runs (`train_loop_per_worker`).

The path of one training batch, per worker:
    Ray Data shard → `batches_of` (prepared pixels, or pictures decoded and cropped) → fresh holes (`random_masks`)
    → `model_input` → model (DDP over gloo) → `reconstruction_loss` → optimizer step.
Every epoch each worker scores its share of the validation split on fixed holes; the totals are
all-reduced, rank 0 logs them to MLflow with a picture of fixed samples, and every worker reports to
Ray Train, rank 0 with a checkpoint. A restarted worker group (a lost worker, or `--resume`) picks
up at the epoch after the last checkpoint, so every epoch reaches MLflow exactly once. The driver's side
(joining Ray, the data, the TorchTrainer, the registered model) is `inpaint.driver`.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train.v2._internal.execution import context as ray_train_context
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from inpaint import pictures, tracking
from inpaint.checkpoints import load_checkpoint_state, save_checkpoint_state
from inpaint.config import Config, from_dict
from inpaint.data import batch_to_tensor, to_float_images
from inpaint.data.crops import crop_batch
from inpaint.masks import apply_holes, fixed_masks, random_masks
from inpaint.metrics import (
    VAL_METRICS,
    MetricTotals,
    all_reduce_sums,
    best_so_far,
    composite,
    format_metric,
    reconstruction_loss,
)
from inpaint.models import build_model, count_parameters, forward_backward_flops, model_input
from inpaint.runtime import configure_process

BEST_METRICS = ("best_epoch", *(f"best_{name}" for name in VAL_METRICS))  # the best epoch's so far (`best_so_far`)
# reported every epoch; `training_minutes`: the wall minutes of the epochs so far (training and validation), the
# clock a study's scheduler may compare trials by (tune_spaces/README.md)
EPOCH_METRICS = ("epoch", "train_loss", *VAL_METRICS, "images_per_s", "lr", "training_minutes", *BEST_METRICS)
CURVES = ["train_loss", "val_loss", "val_psnr_hole", "val_dice"]  # drawn in curves.png
BN_BATCHES = 16  # an epoch's last training batches, on which the weights' average re-estimates its BatchNorm statistics


# ---------------------------------------------------------------------------------------------
# Plain PyTorch pieces (no Ray): usable in a notebook and in evaluation.


def build_optimizer(model: torch.nn.Module, cfg: Config, steps_per_epoch: int):
    """The optimizer and a per-step LR schedule: linear warm-up, then constant or cosine decay."""
    opt_class = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_class(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = cfg.train.warmup_epochs * steps_per_epoch
    total = cfg.train.epochs * steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup:  # at most the full rate: a warm-up shorter than one step must not overshoot it
            return min(1.0, (step + 1) / warmup)
        if cfg.train.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def training_precision(cfg: Config) -> str:
    """`train.precision` on this machine: "auto" is bf16 where the CPU computes bf16 natively (AVX-512
    BF16 or AMX; emulated bf16 is no faster than fp32), else fp32."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    # torch.cpu's own checks (private, stable under the pinned torch)
    return "bf16" if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else "fp32"


def autocast(cfg: Config) -> torch.autocast:
    """The training forward pass's precision: bf16 autocast on the CPU where `training_precision` says bf16."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=training_precision(cfg) == "bf16")


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    images: torch.Tensor,
    masks: torch.Tensor,
    cfg: Config,
) -> torch.Tensor:
    """One optimizer step on images with these holes; returns the loss (forward under `autocast(cfg)`)."""
    with autocast(cfg):
        pred = model(model_input(apply_holes(images, masks), masks, cfg.model.prefill))
        loss = reconstruction_loss(pred.float(), images, masks, cfg.train.loss, cfg.train.hole_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss


@torch.no_grad()
def fill(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, prefill: str) -> torch.Tensor:
    """The network's output for images with these holes, prefilled as `model.prefill` says (raw output;
    metrics composite it)."""
    return model(model_input(apply_holes(images, masks), masks, prefill))


def validation_holes(cfg: Config, index: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return fixed_masks(index, height, width, cfg.val_masks, cfg.train.val_seed)


# ---------------------------------------------------------------------------------------------
# The worker loop: what each Ray Train worker runs, one named step after another.


class ImageBatches(NumpyBatchCollateFn):
    """Ray Data's numpy batches of prepared rows → (images float (N, 3, H, W), index) tensors."""

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_to_tensor(batch)


class PictureCrops(NumpyBatchCollateFn):
    """Ray Data's numpy batches of encoded pictures → their crops as (images float (N, 3, crop, crop), index):
    the crops of training epoch `epoch`, or validation's fixed ones (`epoch` None)."""

    def __init__(self, crop: int, seed: int, epoch: int | None) -> None:
        super().__init__()
        self.crop, self.seed, self.epoch = crop, seed, epoch

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = crop_batch(batch["image"], batch["name"], batch["index"], self.crop, self.seed, self.epoch)
        return to_float_images(pixels), torch.tensor(batch["index"], dtype=torch.int64)  # a copy: Ray's is read-only


def batches_of(cfg: Config, epoch: int | None) -> NumpyBatchCollateFn:
    """How a worker turns its shard's rows into tensors: crops of pictures of any size (`data.crop_size`), of
    training epoch `epoch` or validation's (None), else a prepared dataset's whole pictures."""
    if not cfg.data.crop_size:
        return ImageBatches()
    seed = cfg.train.val_seed if epoch is None else cfg.train.seed
    return PictureCrops(cfg.data.crop_size, seed, epoch)


@dataclass
class Worker:
    """What one Ray Train worker holds from epoch to epoch."""

    cfg: Config
    rank: int
    world_size: int
    module: torch.nn.Module  # the plain network: checkpoints and pictures are made from it
    model: torch.nn.Module  # the same network as DDP trains it (after `prepare_model`)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    run_id: str
    tracking_uri: str
    height: int
    width: int
    steps_per_epoch: int
    ema: AveragedModel | None = None  # the weights' moving average, where `train.ema_decay` asks for one
    recent_inputs: deque = field(default_factory=lambda: deque(maxlen=BN_BATCHES))  # for the average's BatchNorm
    best: dict[str, float] = field(default_factory=dict)  # `best_*` as last reported
    minutes: float = 0.0  # `training_minutes` as last reported

    @property
    def delivered(self) -> torch.nn.Module:
        """The weights the run delivers (validated, pictured, registered): the average if kept, else the network."""
        return self.ema.module if self.ema else self.module


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker's run: restore, then per epoch train, validate, checkpoint and report, log (rank 0)."""
    configure_process()
    # Ray Train logs each report's whole metrics dict at INFO on every worker, on a logger named by its module's
    # file (ray==2.60, as pinned): the epoch line says it once. Ray Train's other INFO lines (a retry) still show.
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    worker = start_worker(loop_config)
    first_epoch = restore(worker)
    worker.model = ray.train.torch.prepare_model(worker.module)  # DDP over gloo; worker.module stays plain
    samples = loop_config["samples"]  # the first validation pictures, drawn by rank 0 every epoch
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    for epoch in range(first_epoch, worker.cfg.train.epochs + 1):
        started = time.perf_counter()
        train_sums = train_one_epoch(worker, train_shard, epoch)
        if worker.ema:
            refresh_average_batch_norm(worker)
        metrics = validate(worker, val_shard, epoch, train_sums)
        worker.minutes += (time.perf_counter() - started) / 60  # validate's all-reduce: every worker's epoch ends here
        metrics["training_minutes"] = worker.minutes
        metrics |= best_so_far(metrics, worker.best, worker.cfg.train.best_metric)
        worker.best = {key: metrics[key] for key in BEST_METRICS}
        checkpoint_and_report(worker, epoch, metrics)
        if worker.rank == 0:
            log_epoch(worker, epoch, metrics, samples)


def start_worker(loop_config: dict[str, Any]) -> Worker:
    """The config, this worker's threads, and the network with its optimizer: the same weights on every worker.
    Rank 0 logs what the network costs (`log_cost`) and the precision it trains in."""
    cfg = from_dict(loop_config["config"])
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))  # one thread per CPU Ray gave us
    cfg.train.precision = training_precision(cfg)  # "auto" resolved once, for this worker's CPU, not every step
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.train.seed)  # same initial weights on every worker
    module = build_model(cfg.model)
    if rank == 0:
        run_id, uri = loop_config["mlflow_run_id"], loop_config["tracking_uri"]
        tracking.set_tag(run_id, "train.precision_used", cfg.train.precision, tracking_uri=uri)
        log_cost(module, loop_config["height"], loop_config["width"], run_id, uri)
    if cfg.train.channels_last:
        module = module.to(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(loop_config["train_rows"] / (cfg.train.batch_size * world_size))
    optimizer, scheduler = build_optimizer(module, cfg, steps_per_epoch)
    ema = None
    if cfg.train.ema_decay > 0:  # the parameters; BatchNorm statistics come from `refresh_average_batch_norm`
        ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay))
    return Worker(
        cfg, rank, world_size, module, module, optimizer, scheduler,
        loop_config["mlflow_run_id"], loop_config["tracking_uri"],
        loop_config["height"], loop_config["width"], steps_per_epoch, ema,
    )  # fmt: skip


def log_cost(module: torch.nn.Module, height: int, width: int, run_id: str, tracking_uri: str) -> None:
    """The network's parameter count and training GFLOPs per picture as metrics at step 0, so that runs and
    trials sort by cost beside their quality (counted on a copy: the weights and the random stream stay as
    they were)."""
    cost = {
        "model_parameters": count_parameters(module),
        "model_gflops_per_image": forward_backward_flops(module, height, width) / 1e9,
    }
    tracking.log_metrics_once(run_id, cost, step=0, tracking_uri=tracking_uri)


def restore(worker: Worker) -> int:
    """Load Ray Train's latest checkpoint (a restarted worker group, or `--resume`), if any; the first epoch to run."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 1
    with checkpoint.as_directory() as path:
        state = load_checkpoint_state(path)
    worker.module.load_state_dict(state["model"])
    worker.optimizer.load_state_dict(state["optimizer"])
    worker.scheduler.load_state_dict(state["scheduler"])
    if worker.ema and "ema" in state:  # else (EMA newly asked for) the average starts from these weights
        worker.ema.load_state_dict(state["ema"])
    saved = state["metrics"]  # with no `best_*` (a checkpoint from before they were reported), its own epoch's
    worker.best = best_so_far(saved, {k: saved[k] for k in BEST_METRICS if k in saved}, worker.cfg.train.best_metric)
    worker.minutes = saved.get("training_minutes", 0.0)  # a checkpoint from before it was reported: from 0
    if worker.rank == 0:  # the run may have stopped between the checkpoint and its MLflow metrics
        print(f"resumed from the checkpoint of epoch {state['epoch']}", flush=True)
        tracking.log_metrics_once(
            worker.run_id, state["metrics"], step=state["epoch"], tracking_uri=worker.tracking_uri
        )
    return state["epoch"] + 1


def train_one_epoch(worker: Worker, shard: ray.data.DataIterator, epoch: int) -> dict[str, float]:
    """One pass over this worker's shard, fresh holes every batch; returns its sums: loss, images, seconds."""
    cfg = worker.cfg
    # fresh holes every epoch, different on every worker, reproducible after a restart
    holes = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch * 1_009 + worker.rank)
    progress_every = max(1, worker.steps_per_epoch // 10)  # a progress line every tenth of an epoch
    worker.model.train()
    loss_sum, images_seen, started = 0.0, 0, time.perf_counter()
    batches = shard.iter_torch_batches(
        batch_size=cfg.train.batch_size, collate_fn=batches_of(cfg, epoch), prefetch_batches=2
    )
    for step, (images, _) in enumerate(batches, start=1):
        masks = random_masks(len(images), worker.height, worker.width, cfg.masks, holes)
        loss = train_step(worker.model, worker.optimizer, worker.scheduler, images, masks, cfg)
        if worker.ema:
            worker.ema.update_parameters(worker.module)
            worker.recent_inputs.append(model_input(apply_holes(images, masks), masks, cfg.model.prefill))
        loss_sum += loss.item() * len(images)
        images_seen += len(images)
        if worker.rank == 0 and step % progress_every == 0:
            rate = images_seen * worker.world_size / (time.perf_counter() - started)
            print(
                f"epoch {epoch} step {step}/{worker.steps_per_epoch}  loss {loss_sum / images_seen:.4f}  "
                f"{rate:.0f} img/s",
                flush=True,
            )
    return {"loss": loss_sum, "images": images_seen, "seconds": time.perf_counter() - started}


@torch.no_grad()
def refresh_average_batch_norm(worker: Worker) -> None:
    """Estimate the averaged weights' BatchNorm statistics afresh, on this epoch's last training batches
    (`update_bn`, under the training precision), then average them over the workers so that every worker
    validates, and rank 0 checkpoints, the same model. Statistics averaged over steps do not fit averaged
    weights (docs/results.md measures how far off they are)."""
    with autocast(worker.cfg):
        update_bn(list(worker.recent_inputs), worker.ema.module)
    for module in worker.ema.module.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            for statistic in (module.running_mean, module.running_var):
                dist.all_reduce(statistic)
                statistic /= worker.world_size


def validate(worker: Worker, shard: ray.data.DataIterator, epoch: int, trained: dict[str, float]) -> dict[str, float]:
    """Score this worker's share of the validation split on its fixed holes (in fp32), then add up those
    sums and the epoch's training sums over the workers in one call: every worker gets the epoch's metrics.

    `val_*` score the delivered weights; with an EMA, `raw_val_*` score the network's own beside them; with
    `model.prefill`, `prefill_val_*` score that fill alone, where the network starts from: what it has gained."""
    cfg = worker.cfg
    scored = {"val": worker.delivered} | ({"raw_val": worker.model} if worker.ema else {})
    prefill = cfg.model.prefill
    totals = {prefix: MetricTotals() for prefix in [*scored, *(["prefill_val"] if prefill != "none" else [])]}
    val_loss_sum = 0.0
    for model in scored.values():
        model.eval()
    for images, index in shard.iter_torch_batches(batch_size=256, collate_fn=batches_of(cfg, None)):
        masks = validation_holes(cfg, index, worker.height, worker.width)
        inputs = model_input(apply_holes(images, masks), masks, prefill)  # prefilled once for every score
        if prefill != "none":
            totals["prefill_val"].update(images, inputs[:, :3], masks)
        for prefix, model in scored.items():
            with torch.no_grad():
                pred = model(inputs)
            totals[prefix].update(images, pred, masks)
            if prefix == "val":
                loss = reconstruction_loss(pred, images, masks, cfg.train.loss, cfg.train.hole_weight)
                val_loss_sum += loss.item() * len(images)
    sums = {prefix: t.sums for prefix, t in totals.items()} | {"train": trained | {"val_loss": val_loss_sum}}
    sums = all_reduce_sums(sums)
    train = sums.pop("train")
    metrics = {"epoch": epoch, "train_loss": train["loss"] / train["images"]}
    metrics["val_loss"] = train["val_loss"] / sums["val"]["images"]
    for prefix, summed in sums.items():
        totals[prefix].sums = summed
        metrics |= {f"{prefix}_{name}": value for name, value in totals[prefix].compute().items()}
    # workers run side by side: the epoch's wall time is their mean time
    return metrics | {
        "images_per_s": train["images"] / (train["seconds"] / worker.world_size),
        "lr": worker.scheduler.get_last_lr()[0],
    }


def checkpoint_and_report(worker: Worker, epoch: int, metrics: dict[str, float]) -> None:
    """Report the epoch to Ray Train, rank 0 with a checkpoint of everything a restart needs."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if worker.rank == 0:
            state = {
                "model": worker.module.state_dict(),
                "optimizer": worker.optimizer.state_dict(),
                "scheduler": worker.scheduler.state_dict(),
                "epoch": epoch,
                "config": worker.cfg.to_dict(),
                "metrics": metrics,
            } | ({"ema": worker.ema.state_dict()} if worker.ema else {})
            save_checkpoint_state(folder, state)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def log_epoch(worker: Worker, epoch: int, metrics: dict[str, float], samples: tuple[np.ndarray, np.ndarray]) -> None:
    """Rank 0: the epoch's metrics and a picture of fixed validation samples to MLflow, and one line.

    After `report()`: a restart from this checkpoint re-sends these metrics, and one that lost it (a worker
    died before Ray Train registered it) redoes the epoch; `log_metrics_once` keeps either to one record."""
    tracking.log_metrics_once(worker.run_id, metrics, step=epoch, tracking_uri=worker.tracking_uri)
    picture = sample_picture(worker.delivered, worker.cfg, *samples)
    tracking.log_picture(worker.run_id, picture, f"samples/epoch_{epoch:03d}.png", tracking_uri=worker.tracking_uri)

    def score(name: str) -> str:
        text = f"{name} {format_metric(name, metrics[name])}"
        if f"prefill_{name}" in metrics and name == "val_psnr_hole":  # beside the fill the network corrects
            text += f" ({worker.cfg.model.prefill} {format_metric(name, metrics[f'prefill_{name}'])} alone)"
        return text

    scores = "  ".join(score(name) for name in ("train_loss", *VAL_METRICS))
    print(f"epoch {epoch}/{worker.cfg.train.epochs}  {scores}  {metrics['images_per_s']:.0f} img/s", flush=True)


def sample_picture(module: torch.nn.Module, cfg: Config, pixels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """masked | filled | ground truth for these validation images on their fixed holes.

    Drawn with the plain module on one worker only: a forward through the DDP wrapper after a training
    step would start a buffer broadcast that the other workers never join."""
    images = to_float_images(pixels)
    masks = validation_holes(cfg, torch.from_numpy(index), *images.shape[-2:])
    filled = composite(fill(module, images, masks, cfg.model.prefill), images, masks)  # what a user gets back
    return pictures.sample_grid(apply_holes(images, masks), filled, images, masks)
