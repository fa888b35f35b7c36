"""Data-parallel training with Ray Train: the per-worker loop and the TorchTrainer it runs in.

The path of one training batch, per worker:
    Ray Data shard → `batch_to_tensor` (uint8 bytes → float images) → fresh holes (`random_masks`)
    → `model_input` → model (DDP over gloo) → `reconstruction_loss` → optimizer step.
Every epoch each worker scores its share of the validation split on fixed holes; the totals are
all-reduced, rank 0 logs them to MLflow with a picture of fixed samples, and every worker reports to
Ray Train, rank 0 with a checkpoint. A restarted worker group (a lost worker, or `--resume`) picks
up at the epoch after the last checkpoint, so every epoch reaches MLflow exactly once.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train.torch import TorchTrainer
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from inpaint import storage, tracking
from inpaint.checkpoints import load_checkpoint_state, model_from_state, save_checkpoint_state
from inpaint.config import VAL_METRICS, Config, from_dict, load_config
from inpaint.data import batch_to_tensor, is_prepared, prepare, read_manifest, read_split, split_files, to_float_images
from inpaint.errors import RunFailed, UserError
from inpaint.masks import apply_holes, fixed_masks, random_masks
from inpaint.metrics import MetricTotals, composite, reconstruction_loss
from inpaint.models import build_model, model_input
from inpaint.runtime import configure_process

LOWER_IS_BETTER = {"val_loss", "val_l1_hole", "train_loss"}
EPOCH_METRICS = ("epoch", "train_loss", *VAL_METRICS, "images_per_s", "lr")  # what a worker reports every epoch
CURVES = ["train_loss", "val_loss", "val_psnr_hole", "val_dice"]  # drawn in curves.png
BN_BATCHES = 16  # an epoch's last training batches, on which the weights' average re-estimates its BatchNorm statistics


def metric_mode(metric: str) -> str:
    """ "min" or "max": which way a metric improves."""
    return "min" if metric in LOWER_IS_BETTER else "max"


# ---------------------------------------------------------------------------------------------
# Plain PyTorch pieces (no Ray): usable in a notebook and in evaluation.


def build_optimizer(model: torch.nn.Module, cfg: Config, steps_per_epoch: int):
    """The optimizer and a per-step LR schedule: linear warm-up, then constant or cosine decay."""
    opt_class = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_class(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = cfg.train.warmup_epochs * steps_per_epoch
    total = cfg.train.epochs * steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
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
        pred = model(model_input(apply_holes(images, masks), masks))
        loss = reconstruction_loss(pred.float(), images, masks, cfg.train.loss, cfg.train.hole_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss


@torch.no_grad()
def fill(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The network's output for images with these holes (raw output; metrics composite it)."""
    return model(model_input(apply_holes(images, masks), masks))


def validation_holes(cfg: Config, index: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return fixed_masks(index, height, width, cfg.val_masks, cfg.train.val_seed)


# ---------------------------------------------------------------------------------------------
# The worker loop: what each Ray Train worker runs, one named step after another.


class ImageBatches(NumpyBatchCollateFn):
    """Ray Data's numpy batches of prepared rows → (images float (N, 3, H, W), index) tensors."""

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_to_tensor(batch)


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

    @property
    def delivered(self) -> torch.nn.Module:
        """The weights the run delivers (validated, pictured, registered): the average if kept, else the network."""
        return self.ema.module if self.ema else self.module


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker's run: restore, then per epoch train, validate, checkpoint and report, log (rank 0)."""
    configure_process()
    worker = start_worker(loop_config)
    first_epoch = restore(worker)
    worker.model = ray.train.torch.prepare_model(worker.module)  # DDP over gloo; worker.module stays plain
    samples = read_split(loop_config["data"], "val", limit=worker.cfg.train.samples) if worker.rank == 0 else None
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    for epoch in range(first_epoch, worker.cfg.train.epochs + 1):
        train_sums = train_one_epoch(worker, train_shard, epoch)
        if worker.ema:
            refresh_average_batch_norm(worker)
        metrics = validate(worker, val_shard, epoch, train_sums)
        checkpoint_and_report(worker, epoch, metrics)
        if worker.rank == 0:
            log_epoch(worker, epoch, metrics, samples)


def start_worker(loop_config: dict[str, Any]) -> Worker:
    """The config, this worker's threads, and the network with its optimizer: the same weights on every worker."""
    cfg = from_dict(loop_config["config"])
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))  # one thread per CPU Ray gave us
    cfg.train.precision = training_precision(cfg)  # "auto" resolved once, for this worker's CPU, not every step
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if rank == 0:
        tracking.set_tag(
            loop_config["mlflow_run_id"], "train.precision_used", cfg.train.precision,
            tracking_uri=loop_config["tracking_uri"],
        )  # fmt: skip
    torch.manual_seed(cfg.train.seed)  # same initial weights on every worker
    module = build_model(cfg.model)
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
    if worker.rank == 0:  # the run may have stopped between the checkpoint and its MLflow metrics
        print(f"resumed from the checkpoint of epoch {state['epoch']}", flush=True)
        tracking.log_metrics_once(
            worker.run_id, state["metrics"], step=state["epoch"], tracking_uri=worker.tracking_uri
        )
    return state["epoch"] + 1


def train_one_epoch(worker: Worker, shard: ray.data.DataIterator, epoch: int) -> list[float]:
    """One pass over this worker's shard, fresh holes every batch; returns [loss sum, images, seconds]."""
    cfg = worker.cfg
    # fresh holes every epoch, different on every worker, reproducible after a restart
    holes = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch * 1_009 + worker.rank)
    progress_every = max(1, worker.steps_per_epoch // 10)  # a progress line every tenth of an epoch
    worker.model.train()
    loss_sum, images_seen, started = 0.0, 0, time.perf_counter()
    batches = shard.iter_torch_batches(batch_size=cfg.train.batch_size, collate_fn=ImageBatches(), prefetch_batches=2)
    for step, (images, _) in enumerate(batches, start=1):
        masks = random_masks(len(images), worker.height, worker.width, cfg.masks, holes)
        loss = train_step(worker.model, worker.optimizer, worker.scheduler, images, masks, cfg)
        if worker.ema:
            worker.ema.update_parameters(worker.module)
            worker.recent_inputs.append(model_input(apply_holes(images, masks), masks))
        loss_sum += loss.item() * len(images)
        images_seen += len(images)
        if worker.rank == 0 and step % progress_every == 0:
            rate = images_seen * worker.world_size / (time.perf_counter() - started)
            print(
                f"epoch {epoch} step {step}/{worker.steps_per_epoch}  loss {loss_sum / images_seen:.4f}  "
                f"{rate:.0f} img/s",
                flush=True,
            )
    return [loss_sum, images_seen, time.perf_counter() - started]


@torch.no_grad()
def refresh_average_batch_norm(worker: Worker) -> None:
    """Estimate the averaged weights' BatchNorm statistics afresh, on this epoch's last training batches
    (`update_bn`, under the training precision), then average them over the workers so that every worker
    validates, and rank 0 checkpoints, the same model. Statistics averaged over steps do not fit averaged
    weights: 14.2 against 18.3 dB hole PSNR after 2 epochs (docs/results.md)."""
    with autocast(worker.cfg):
        update_bn(list(worker.recent_inputs), worker.ema.module)
    for module in worker.ema.module.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            for statistic in (module.running_mean, module.running_var):
                dist.all_reduce(statistic)
                statistic /= worker.world_size


def validate(worker: Worker, shard: ray.data.DataIterator, epoch: int, train_sums: list[float]) -> dict[str, float]:
    """Score this worker's share of the validation split on its fixed holes (in fp32), then all-reduce
    those totals and the epoch's training sums in one call: every worker gets the epoch's metrics.

    `val_*` score the delivered weights; with an EMA, `raw_val_*` score the network's own beside them."""
    cfg = worker.cfg
    scored = {"val": worker.delivered} | ({"raw_val": worker.model} if worker.ema else {})
    totals = {prefix: MetricTotals() for prefix in scored}
    val_loss_sum = 0.0
    for model in scored.values():
        model.eval()
    for images, index in shard.iter_torch_batches(batch_size=256, collate_fn=ImageBatches()):
        masks = validation_holes(cfg, index, worker.height, worker.width)
        for prefix, model in scored.items():
            pred = fill(model, images, masks)
            totals[prefix].update(images, pred, masks)
            if prefix == "val":
                loss = reconstruction_loss(pred, images, masks, cfg.train.loss, cfg.train.hole_weight)
                val_loss_sum += loss.item() * len(images)
    summed = torch.cat(
        [*(t.state() for t in totals.values()), torch.tensor([*train_sums, val_loss_sum], dtype=torch.float64)]
    )
    dist.all_reduce(summed)
    loss_total, seen_total, seconds_total, val_loss_total = summed[-4:].tolist()
    per_model = summed[:-4].reshape(len(totals), -1)  # one row of totals per scored model, image count last
    metrics = {
        "epoch": epoch,
        "train_loss": loss_total / seen_total,
        "val_loss": val_loss_total / per_model[0, -1].item(),
    }
    for prefix, state in zip(totals, per_model, strict=True):
        metrics |= {f"{prefix}_{name}": value for name, value in MetricTotals.compute(state).items()}
    # workers run side by side: the epoch's wall time is their mean time
    return metrics | {
        "images_per_s": seen_total / (seconds_total / worker.world_size),
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
    print(
        f"epoch {epoch}/{worker.cfg.train.epochs}  train_loss {metrics['train_loss']:.4f}  "
        f"val_psnr_hole {metrics['val_psnr_hole']:.2f} dB  val_dice {metrics['val_dice']:.4f}  "
        f"val_ssim {metrics['val_ssim']:.4f}  {metrics['images_per_s']:.0f} img/s",
        flush=True,
    )


def sample_picture(module: torch.nn.Module, cfg: Config, pixels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """masked | filled | ground truth for these validation images on their fixed holes.

    Drawn with the plain module on one worker only: a forward through the DDP wrapper after a training
    step would start a buffer broadcast that the other workers never join."""
    images = to_float_images(pixels)
    masks = validation_holes(cfg, torch.from_numpy(index), *images.shape[-2:])
    filled = composite(fill(module, images, masks), images, masks)  # what a user gets back
    return tracking.sample_grid(apply_holes(images, masks), filled, images, masks)


# ---------------------------------------------------------------------------------------------
# The driver side: what `jobs/train.py` (and each Tune trial) runs.


@dataclass
class RunResult:
    run_id: str
    run_name: str
    model_uri: str | None
    best_epoch: int
    metrics: dict[str, float]  # the best epoch's
    epochs: int


def check_cluster_fits(cfg: Config) -> None:
    """Ray waits forever for CPUs that do not exist: refuse a run the cluster cannot hold."""
    needed = cfg.scaling.workers * cfg.scaling.cpus_per_worker
    available = ray.cluster_resources().get("CPU", 0)
    if needed > available:
        raise UserError(
            f"{cfg.scaling.workers} workers × {cfg.scaling.cpus_per_worker:g} CPU need {needed:g} CPUs but the Ray "
            f"cluster has {available:g}: lower --workers (or scaling.cpus_per_worker) or add nodes"
        )


def check_data(cfg: Config, data: str) -> None:
    """Refuse, before any Ray work, a dataset with no validation images, holes that cannot be drawn
    on its images, and a checkpoint bucket the job could not write to (else the first epoch's end fails)."""
    manifest = read_manifest(data)
    storage.check_bucket(storage_path(cfg), "checking scaling.storage_path (where checkpoints go)")
    if not manifest["splits"].get("val"):
        raise UserError(
            f"{data} has no validation images: prepare it again with --val N (jobs/prepare.py), N at least 1"
        )
    for name in ("masks", "val_masks"):
        try:
            getattr(cfg, name).validate(manifest["height"], manifest["width"])
        except ValueError as err:
            raise UserError(f"{name}: {err}") from None


def validation_rows(cfg: Config) -> int:
    """`data.val`; a quick run on the first N images keeps the paper's 9:1 train/validation ratio."""
    return min(cfg.data.val, cfg.data.limit // 10) if cfg.data.limit else cfg.data.val


def limited_rows(cfg: Config) -> tuple[int | None, int | None]:
    """How many training and validation rows `data.limit` (and `data.val_limit`) keep: the first N images,
    split 9:1 as `prepare_data` splits a limited source; (None, None) for all of them."""
    if not cfg.data.limit:
        return None, cfg.data.val_limit
    val = validation_rows(cfg)
    return cfg.data.limit - val, min(val, cfg.data.val_limit or val)


def read_datasets(cfg: Config, data: str) -> dict[str, ray.data.Dataset]:
    """The train and validation splits, limited to `data.limit` images and materialized before the workers
    take the CPUs, so that reading never waits on them (a Tune study reads them once for all its trials).

    They are read on this (the driver's) node, so their blocks outlive any worker node: a block lost
    with a node would be rebuilt by a read task, which waits forever for a CPU the workers hold."""
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    datasets = {}
    for split, rows in zip(("train", "val"), limited_rows(cfg), strict=True):
        dataset = ray.data.read_parquet(split_files(data, split), label_selector=here)  # s3://...: Ray's pyarrow S3
        with storage.errors_explained(data, f"reading its {split} split"):
            datasets[split] = (dataset.limit(rows) if rows else dataset).materialize()
    return datasets


def tag_data_rows(run_id: str, datasets: dict[str, ray.data.Dataset], tracking_uri: str) -> None:
    """Tag the run with the images it trains and validates on (`data.limit` applied), and say them."""
    rows = {split: dataset.count() for split, dataset in datasets.items()}  # materialized: no reading
    for split, count in rows.items():
        tracking.set_tag(run_id, f"data.{split}_rows", str(count), tracking_uri=tracking_uri)
    print(f"data: {rows['train']:,} training and {rows['val']:,} validation images", flush=True)


def make_trainer(
    cfg: Config,
    data: str,
    run_name: str,
    mlflow_run_id: str,
    tracking_uri: str,
    datasets: dict[str, ray.data.Dataset],
    *,
    callbacks: list[ray.train.UserCallback] | None = None,
    reserved_cpus: float = 0.0,
) -> TorchTrainer:
    """The TorchTrainer for one run on `datasets` (`read_datasets`); reusing `run_name` and the storage path
    resumes that run.

    A Tune trial passes its `callbacks` and the CPU its own actor holds (`reserved_cpus`): that comes out
    of the workers' share, so the trial fits where its config fits.
    """
    manifest = read_manifest(data)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "data": data,
            "mlflow_run_id": mlflow_run_id,
            "tracking_uri": tracking_uri,
            "height": manifest["height"],
            "width": manifest["width"],
            "train_rows": datasets["train"].count(),  # materialized: counted without reading
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.workers,
            use_gpu=False,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker - reserved_cpus / cfg.scaling.workers},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path(cfg),
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=cfg.train.best_metric,
                checkpoint_score_order=metric_mode(cfg.train.best_metric),
            ),
        ),
        datasets=datasets,
    )


def storage_path(cfg: Config) -> str:
    """`scaling.storage_path` as Ray wants it: a URI, or an absolute path (workers run in other folders)."""
    path = cfg.scaling.storage_path
    return path if storage.is_uri(path) else os.path.abspath(path)


def log_checkpoint_model(
    cfg: Config, checkpoint: ray.train.Checkpoint, run_id: str, data: str, tracking_uri: str
) -> tuple[str, dict[str, Any]]:
    """Log the model a checkpoint holds to the run, registered under `cfg.registered_model` and tagged
    with its epoch and that epoch's validation metrics; returns `models:/NAME/VERSION` and the state."""
    with checkpoint.as_directory() as path:
        state = load_checkpoint_state(path)
    model = model_from_state(state)
    pixels, index = read_split(data, "val", limit=4)
    images = to_float_images(pixels)
    masks = validation_holes(cfg, torch.from_numpy(index), images.shape[-2], images.shape[-1])
    val_tags = {k: f"{v:.4f}" for k, v in state["metrics"].items() if k.startswith("val_")}
    model_uri = tracking.log_model(
        run_id,
        model,
        input_example=model_input(apply_holes(images, masks), masks).numpy(),
        registered_name=cfg.registered_model,
        tags={**val_tags, "epoch": str(state["epoch"])},
        tracking_uri=tracking_uri,
    )
    return model_uri, state


def finish_run(
    cfg: Config, result: ray.train.Result, run_id: str, run_name: str, data: str, tracking_uri: str
) -> RunResult:
    """Log the best epoch's model (registered) and the curves, then end the MLflow run."""
    best_checkpoint = result.get_best_checkpoint(cfg.train.best_metric, metric_mode(cfg.train.best_metric))
    model_uri, state = log_checkpoint_model(cfg, best_checkpoint, run_id, data, tracking_uri)
    history = tracking.metric_history(run_id, CURVES, tracking_uri=tracking_uri)
    tracking.log_picture(run_id, tracking.curves_figure(history, run_name), "curves.png", tracking_uri=tracking_uri)
    tracking.end_run(run_id, "FINISHED", tracking_uri=tracking_uri)
    val_metrics = {k: float(v) for k, v in state["metrics"].items() if k.startswith("val_")}
    return RunResult(run_id, run_name, model_uri, int(state["epoch"]), val_metrics, int(result.metrics["epoch"]))


def failure_cause(err: ray.train.TrainingFailedError) -> str:
    """One line naming what failed: a worker that died (the others then fail on its closed connection),
    else the lowest rank's error, else the controller's."""
    # a dead worker shows as a failed health check wrapping Ray's ActorDiedError: name the latter
    failures = {
        rank: getattr(failure, "health_check_failure", failure)
        for rank, failure in getattr(err, "worker_failures", {}).items()
    }
    if failures:
        rank = min(failures, key=lambda r: (not isinstance(failures[r], ray.exceptions.RayActorError), r))
        cause, where = failures[rank], f"worker {rank}"
    else:
        cause, where = getattr(err, "controller_failure", err), "Ray Train"
    first_line = next((line for line in str(cause).splitlines() if line.strip()), "")
    return f"{where}: {type(cause).__name__}: {first_line}"[:500]


def connect_ray(address: str | None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local Ray; one clear line if it is not there."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("auto", "local"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:  # ray.init retries an absent cluster for minutes: knock first
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as err:
            raise UserError(
                f"no Ray cluster at {address!r} ({err}): start one with `ray start --head` or "
                "deploy/local-cluster.sh up, or leave --address and RAY_ADDRESS unset to run locally"
            ) from None
    dashboard_port = None
    if not address:
        # Ray Train frees the workers of a stopped Tune trial through Ray's state API, which cannot
        # tell which of several Ray instances on one host is ours: point it at our dashboard.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dashboard_port = sock.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"  # Ray's processes inherit it
    # Ctrl-C reaches the whole process group: a local Ray started here inherits an ignored SIGINT, so
    # that it outlives the driver long enough for the driver to mark its MLflow run KILLED and exit.
    driver_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.init(address=address or "local", dashboard_port=dashboard_port, log_to_driver=True)
    except (ConnectionError, RuntimeError) as err:
        raise UserError(
            f"no Ray cluster at {address!r} ({str(err).splitlines()[0]}): start one with `ray start --head` "
            "or deploy/local-cluster.sh up, or leave --address unset to run locally"
        ) from None
    finally:
        signal.signal(signal.SIGINT, driver_handler)


def prepare_data(cfg: Config) -> str:
    """The prepared dataset to train on: `data.path` itself, or what `prepare` makes of that source."""
    source = cfg.data.path or os.environ.get("INPAINT_DATA", "")
    if not source:
        raise UserError("no data given: pass --data DIR (a prepared dataset or a CIFAR-10 source) or set INPAINT_DATA")
    storage.check_bucket(source, f"reading the data {source}")
    if is_prepared(source):
        return source
    if storage.is_uri(source):  # sources are read from local files: a URI can only be a prepared dataset
        raise UserError(
            f"{source} holds no prepared dataset (no manifest.json under it): prepare one there with "
            f"`python jobs/prepare.py --source SRC --out {source}`, or fix the prefix"
        )
    name = os.path.basename(os.path.normpath(source)).split(".")[0] or "data"
    limit = f"-{cfg.data.limit}" if cfg.data.limit else ""
    out = cfg.data.prepared or os.path.abspath(os.path.join("data", f"prepared-{name}{limit}"))
    prepare(source, out, val=validation_rows(cfg), limit=cfg.data.limit, seed=cfg.data.seed)
    return out


def train(
    cfg: Config,
    *,
    resume: str | None = None,
    config_file: str | None = None,
    overrides: Sequence[str] = (),
    values: dict[str, Any] | None = None,
) -> RunResult:
    """One training run: prepared data, MLflow run, TorchTrainer, registered best model.

    With `resume` (a run name printed by an earlier run), that run's saved config, with `config_file`,
    `overrides` and `values` on top as `load_config` applies them (e.g. more epochs), and its checkpoints
    are picked up, and its MLflow run continues. A run whose workers fail past `scaling.max_failures`
    ends FAILED, its cause in the tag `failure`, and raises `RunFailed`; Ctrl-C ends it KILLED.
    """
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_tracking(tracking_uri)  # fail before any Ray work
    if resume:
        run_id, saved = tracking.find_run(tracking_uri, cfg.tracking.experiment, resume)
        cfg = load_config(config_file, overrides, base=saved, values=values)
        run_name = resume
    data = prepare_data(cfg)
    check_data(cfg, data)
    connect_ray(cfg.scaling.address)
    check_cluster_fits(cfg)
    if not resume:
        run_name = cfg.tracking.run_name or f"{cfg.model.variant}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = tracking.start_run(tracking_uri, cfg.tracking.experiment, run_name, cfg.to_dict())
    else:
        tracking.start_run(tracking_uri, cfg.tracking.experiment, run_name, {}, run_id=run_id)  # RUNNING again
    print(f"run {run_name}: MLflow run {run_id} at {tracking_uri}", flush=True)
    datasets = read_datasets(cfg, data)
    tag_data_rows(run_id, datasets, tracking_uri)
    trainer = make_trainer(cfg, data, run_name, run_id, tracking_uri, datasets)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        cause = failure_cause(err)
        tracking.set_tag(run_id, "failure", cause, tracking_uri=tracking_uri)
        tracking.end_run(run_id, "FAILED", tracking_uri=tracking_uri)
        raise RunFailed(f"run {run_name} failed ({cause}); fix the cause, then --resume {run_name}") from None
    except BaseException:  # Ctrl-C, or the driver itself going down
        tracking.end_run(run_id, "KILLED", tracking_uri=tracking_uri)
        raise
    return finish_run(cfg, result, run_id, run_name, data, tracking_uri)
