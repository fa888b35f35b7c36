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
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train.torch import TorchTrainer

from inpaint import tracking
from inpaint.checkpoints import load_checkpoint_state, model_from_state, save_checkpoint_state
from inpaint.config import Config, from_dict, load_config
from inpaint.data import batch_to_tensor, is_prepared, prepare, read_manifest, read_split, split_files
from inpaint.errors import UserError
from inpaint.masks import apply_holes, fixed_masks, random_masks
from inpaint.metrics import MetricTotals, composite, reconstruction_loss
from inpaint.models import build_model, model_input

LOWER_IS_BETTER = {"val_loss", "val_l1_hole", "train_loss"}
CURVES = ["train_loss", "val_loss", "val_psnr_hole", "val_dice"]  # drawn in curves.png


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
# The worker loop: what each Ray Train worker runs.


class ImageBatches(NumpyBatchCollateFn):
    """Ray Data's numpy batches of prepared rows → (images float (N, 3, H, W), index) tensors."""

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_to_tensor(batch)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = from_dict(loop_config["config"])
    run_id, tracking_uri = loop_config["mlflow_run_id"], loop_config["tracking_uri"]
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))  # one thread per CPU Ray gave us
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    height, width = loop_config["height"], loop_config["width"]
    steps_per_epoch = math.ceil(loop_config["train_rows"] / (cfg.train.batch_size * world_size))
    progress_every = max(1, steps_per_epoch // 10)  # a progress line every tenth of an epoch

    cfg.train.precision = training_precision(cfg)  # "auto" resolved once, for this worker's CPU, not every step
    if rank == 0:
        tracking.set_tag(run_id, "train.precision_used", cfg.train.precision, tracking_uri=tracking_uri)

    torch.manual_seed(cfg.train.seed)  # same initial weights on every worker
    model = build_model(cfg.model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, cfg, steps_per_epoch)
    start_epoch = 1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as path:
            state = load_checkpoint_state(path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        if rank == 0:  # the run may have stopped between the checkpoint and its MLflow metrics
            print(f"resumed from the checkpoint of epoch {state['epoch']}", flush=True)
            tracking.log_metrics_once(run_id, state["metrics"], step=state["epoch"], tracking_uri=tracking_uri)
    model = ray.train.torch.prepare_model(model)
    samples = read_split(loop_config["data"], "val", limit=cfg.train.samples) if rank == 0 else None

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        # fresh holes every epoch, different on every worker, reproducible after a restart
        holes = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch * 1_009 + rank)
        model.train()
        loss_sum, images_seen, started = 0.0, 0, time.perf_counter()
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.train.batch_size, collate_fn=ImageBatches(), prefetch_batches=2
        )
        for step, (images, _) in enumerate(batches, start=1):
            masks = random_masks(len(images), height, width, cfg.masks, holes)
            loss = train_step(model, optimizer, scheduler, images, masks, cfg)  # validation below stays fp32
            loss_sum += loss.item() * len(images)
            images_seen += len(images)
            if rank == 0 and step % progress_every == 0:
                elapsed = time.perf_counter() - started
                print(
                    f"epoch {epoch} step {step}/{steps_per_epoch}  loss {loss_sum / images_seen:.4f}  "
                    f"{images_seen * world_size / elapsed:.0f} img/s",
                    flush=True,
                )
        train_seconds = time.perf_counter() - started

        model.eval()
        totals, val_loss_sum = MetricTotals(), 0.0
        for images, index in val_shard.iter_torch_batches(batch_size=256, collate_fn=ImageBatches()):
            masks = validation_holes(cfg, index, height, width)
            pred = fill(model, images, masks)
            loss = reconstruction_loss(pred, images, masks, cfg.train.loss, cfg.train.hole_weight)
            val_loss_sum += loss.item() * len(images)
            totals.update(images, pred, masks)
        # one all-reduce for everything the epoch's metrics need
        summed = torch.cat([totals.state(), torch.tensor([loss_sum, images_seen, val_loss_sum, train_seconds])])
        dist.all_reduce(summed)
        state_sums, (loss_total, seen_total, val_loss_total, seconds_total) = summed[:-4], summed[-4:].tolist()
        val = MetricTotals.compute(state_sums)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_total / seen_total,
            "val_loss": val_loss_total / state_sums[-1].item(),
            **{f"val_{name}": value for name, value in val.items()},
            # workers run side by side: the epoch's wall time is their mean time
            "images_per_s": seen_total / (seconds_total / world_size),
            "lr": scheduler.get_last_lr()[0],
        }

        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                unwrapped = model.module if hasattr(model, "module") else model
                save_checkpoint_state(
                    tmp,
                    {
                        "model": unwrapped.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "config": cfg.to_dict(),
                        "metrics": metrics,
                    },
                )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        # After report(): a restart from this checkpoint re-sends these metrics, and one that lost it (a worker
        # died before Ray Train registered it) redoes the epoch; log_metrics_once keeps either to one record.
        if rank == 0:
            tracking.log_metrics_once(run_id, metrics, step=epoch, tracking_uri=tracking_uri)
            images, index = samples
            images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
            masks = validation_holes(cfg, torch.from_numpy(index), height, width)
            filled = composite(fill(model, images, masks), images, masks)  # what a user gets back
            picture = tracking.sample_grid(apply_holes(images, masks), filled, images, masks)
            tracking.log_picture(run_id, picture, f"samples/epoch_{epoch:03d}.png", tracking_uri=tracking_uri)
            print(
                f"epoch {epoch}/{cfg.train.epochs}  train_loss {metrics['train_loss']:.4f}  "
                f"val_psnr_hole {metrics['val_psnr_hole']:.2f} dB  val_dice {metrics['val_dice']:.4f}  "
                f"val_ssim {metrics['val_ssim']:.4f}  {metrics['images_per_s']:.0f} img/s",
                flush=True,
            )


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


def check_holes_fit(cfg: Config, data: str) -> None:
    """Refuse holes that cannot be drawn on the dataset's images, before any Ray work."""
    manifest = read_manifest(data)
    for name in ("masks", "val_masks"):
        try:
            getattr(cfg, name).validate(manifest["height"], manifest["width"])
        except ValueError as err:
            raise UserError(f"{name}: {err}") from None


def read_datasets(cfg: Config, data: str) -> dict[str, ray.data.Dataset]:
    """The train and validation splits, materialized before the workers take the CPUs, so that reading
    never waits on them (a Tune study reads them once for all its trials).

    They are read on this (the driver's) node, so their blocks outlive any worker node: a block lost
    with a node would be rebuilt by a read task, which waits forever for a CPU the workers hold."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # our per-epoch lines say enough
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every worker line shows twice
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    train = ray.data.read_parquet(split_files(data, "train"), label_selector=here)
    val = ray.data.read_parquet(split_files(data, "val"), label_selector=here)
    if cfg.data.val_limit:
        val = val.limit(cfg.data.val_limit)
    return {"train": train.materialize(), "val": val.materialize()}


def make_trainer(
    cfg: Config,
    data: str,
    run_name: str,
    mlflow_run_id: str,
    tracking_uri: str,
    *,
    datasets: dict[str, ray.data.Dataset] | None = None,
    callbacks: list[ray.train.UserCallback] | None = None,
    reserved_cpus: float = 0.0,
) -> TorchTrainer:
    """The TorchTrainer for one run; reusing `run_name` and the storage path resumes that run.

    A Tune trial passes its study's `datasets`, its `callbacks`, and the CPU its own actor holds
    (`reserved_cpus`): that comes out of the workers' share, so the trial fits where its config fits.
    """
    manifest = read_manifest(data)
    datasets = datasets or read_datasets(cfg, data)
    storage_path = cfg.scaling.storage_path
    if "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "data": data,
            "mlflow_run_id": mlflow_run_id,
            "tracking_uri": tracking_uri,
            "height": manifest["height"],
            "width": manifest["width"],
            "train_rows": manifest["splits"]["train"],
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.workers,
            use_gpu=False,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker - reserved_cpus / cfg.scaling.workers},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
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


def log_checkpoint_model(
    cfg: Config, checkpoint: ray.train.Checkpoint, run_id: str, data: str, tracking_uri: str
) -> tuple[str, dict[str, Any]]:
    """Log the model a checkpoint holds to the run, registered under `cfg.registered_model` and tagged
    with its epoch and that epoch's validation metrics; returns `models:/NAME/VERSION` and the state."""
    with checkpoint.as_directory() as path:
        state = load_checkpoint_state(path)
    model = model_from_state(state)
    images, index = read_split(data, "val", limit=4)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
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
    """Log the best epoch's model (registered) and the curves picture, then end the MLflow run."""
    sign = 1 if metric_mode(cfg.train.best_metric) == "max" else -1
    best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda pair: sign * pair[1][cfg.train.best_metric])
    model_uri, state = log_checkpoint_model(cfg, best_checkpoint, run_id, data, tracking_uri)
    val_metrics = {k: float(v) for k, v in best_metrics.items() if k.startswith("val_")}
    history = tracking.metric_history(run_id, CURVES, tracking_uri=tracking_uri)
    picture = tracking.curves_picture(history, run_name)
    tracking.log_picture(run_id, picture, "curves.png", tracking_uri=tracking_uri)
    tracking.end_run(run_id, "FINISHED", tracking_uri=tracking_uri)
    return RunResult(run_id, run_name, model_uri, int(state["epoch"]), val_metrics, int(result.metrics["epoch"]))


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
    if is_prepared(source):
        return source
    name = os.path.basename(os.path.normpath(source)).split(".")[0] or "data"
    limit = f"-{cfg.data.limit}" if cfg.data.limit else ""
    out = cfg.data.prepared or os.path.abspath(os.path.join("data", f"prepared-{name}{limit}"))
    # a quick run on the first N images keeps the paper's 9:1 train/validation ratio
    val = min(cfg.data.val, cfg.data.limit // 10) if cfg.data.limit else cfg.data.val
    prepare(source, out, val=val, limit=cfg.data.limit, seed=cfg.data.seed)
    return out


def train(cfg: Config, *, resume: str | None = None, overrides: list[str] | None = None) -> RunResult:
    """One training run: prepared data, MLflow run, TorchTrainer, registered best model.

    With `resume` (a run name printed by an earlier run), that run's saved config, with `overrides`
    on top (e.g. more epochs), and its checkpoints are picked up, and its MLflow run continues.
    """
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_tracking(tracking_uri)  # fail before any Ray work
    if resume:
        run_id, saved = tracking.find_run(tracking_uri, cfg.tracking.experiment, resume)
        cfg = load_config(None, overrides, base=saved)
        run_name = resume
    data = prepare_data(cfg)
    check_holes_fit(cfg, data)
    connect_ray(cfg.scaling.address)
    check_cluster_fits(cfg)
    if not resume:
        run_name = cfg.tracking.run_name or f"{cfg.model.variant}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = tracking.start_run(tracking_uri, cfg.tracking.experiment, run_name, cfg.to_dict())
    else:
        tracking.start_run(tracking_uri, cfg.tracking.experiment, run_name, {}, run_id=run_id)  # RUNNING again
    print(f"run {run_name}: MLflow run {run_id} at {tracking_uri}", flush=True)
    trainer = make_trainer(cfg, data, run_name, run_id, tracking_uri)
    try:
        result = trainer.fit()
    except BaseException:
        tracking.end_run(run_id, "KILLED", tracking_uri=tracking_uri)
        raise
    if result.error is not None:
        tracking.end_run(run_id, "FAILED", tracking_uri=tracking_uri)
        raise result.error
    return finish_run(cfg, result, run_id, run_name, data, tracking_uri)
