"""What a job's driver does for one training run or a Tune study, before and after the workers run.

    result = train(load_config("configs/paper.yaml"))

Join Ray (`connect_ray`), prepare and check the data (`prepare_data`, `check_data`), refuse a run the
cluster cannot hold (`check_cluster_fits`), read the splits once (`read_datasets`), build the
`TorchTrainer` that runs `train.train_loop_per_worker` on every worker (`make_trainer`), and after `fit()`
log and register the best epoch's model (`finish_run`). `tune.py` uses the same steps for each trial.
"""

from __future__ import annotations

import os
import shlex
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from inpaint import pictures, runtime, storage, tracking
from inpaint.checkpoints import load_checkpoint_state, model_from_state
from inpaint.config import Config, TrackingConfig, load_config, with_values
from inpaint.data import folders, is_prepared, prepare, read_manifest, read_split, split_files, to_float_images
from inpaint.data.crops import crop_batch
from inpaint.data.sources import report
from inpaint.errors import RunFailed, RunStopped, UserError
from inpaint.masks import apply_holes
from inpaint.metrics import metric_mode
from inpaint.models import TrainScale, model_input
from inpaint.train import CURVES, train_loop_per_worker, validation_holes


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


def picture_size(cfg: Config, data: str) -> tuple[int, int]:
    """The (H, W) the network trains at: `data.crop_size` square crops of a picture source, else the prepared
    dataset's pictures."""
    if cfg.data.crop_size:
        return cfg.data.crop_size, cfg.data.crop_size
    manifest = read_manifest(data)
    return manifest["height"], manifest["width"]


def picture_splits(cfg: Config, data: str) -> dict[str, list[folders.Picture]]:
    """A picture source's train and val pictures, `data.limit` and `data.val_limit` applied."""
    splits = folders.list_pictures(data, cfg.data.val_path, cfg.data.val_share, cfg.data.seed, cfg.data.limit)
    return splits | {"val": splits["val"][: cfg.data.val_limit]}


def check_data(cfg: Config, data: str) -> None:
    """Refuse, before any Ray work, a dataset with no validation images, holes that cannot be drawn
    on its images, and a checkpoint bucket the job could not write to (else the first epoch's end fails)."""
    if cfg.data.crop_size:
        if not picture_splits(cfg, data)["val"]:
            raise UserError(f"{data} has no validation pictures: pass data.val_path, or a data.val_share above 0")
    elif not read_manifest(data)["splits"].get("val"):
        raise UserError(
            f"{data} has no validation images: prepare it again with --val N (jobs/prepare.py), N at least 1"
        )
    storage.check_bucket(storage_path(cfg), "checking scaling.storage_path (where checkpoints go)")
    height, width = picture_size(cfg, data)
    multiple = cfg.model.size_multiple  # else the first forward pass fails inside a worker
    if height % multiple or width % multiple:
        fix = f"a data.crop_size divisible by {multiple}" if cfg.data.crop_size else "fewer levels"
        raise UserError(
            f"the {height}×{width} training pictures of {data} do not suit model.widths of {len(cfg.model.widths)} "
            f"levels, which needs sides divisible by {multiple}: use {fix}"
        )
    for name in ("masks", "val_masks"):
        try:
            getattr(cfg, name).validate(height, width, section=name)
        except ValueError as err:
            raise UserError(str(err)) from None


def with_image_size(cfg: Config, data: str) -> Config:
    """`cfg` with `data.image_size` set to the training pictures' size: the scale the network learns at, which
    a saved model carries to the fill of larger pictures. A value given that differs is refused."""
    size = list(picture_size(cfg, data))
    if cfg.data.image_size not in (None, size):
        raise UserError(
            f"data.image_size is {cfg.data.image_size} but {data} trains on {size[0]}×{size[1]} pictures: "
            "leave data.image_size unset, the job fills it in from the data"
        )
    return with_values(cfg, {"data.image_size": size})


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
    if cfg.data.crop_size:
        datasets = read_picture_datasets(cfg, data, {"label_selector": here})
    else:
        datasets = {}
        for split, rows in zip(("train", "val"), limited_rows(cfg), strict=True):
            dataset = ray.data.read_parquet(split_files(data, split), label_selector=here)  # s3://: Ray's pyarrow S3
            with storage.errors_explained(data, f"reading its {split} split"):
                datasets[split] = (dataset.limit(rows) if rows else dataset).materialize()
    for split, dataset in datasets.items():  # Ray Train gives each worker an equal share, dropping the rest
        if (count := dataset.count()) < cfg.scaling.workers:
            raise UserError(
                f"{data}: {count} {split} picture(s) for {cfg.scaling.workers} workers, which need one each at "
                f"least: add pictures{' (or raise data.val_share)' if cfg.data.crop_size else ''} or lower --workers"
            )
    return datasets


def read_picture_datasets(cfg: Config, data: str, ray_args: dict[str, Any]) -> dict[str, ray.data.Dataset]:
    """A picture source's splits as Ray Data reads them (`folders.read_pictures`): the usable pictures, encoded,
    each training picture `data.crops_per_picture` times."""
    crop, datasets = cfg.data.crop_size, {}
    for split, listed in picture_splits(cfg, data).items():
        with storage.errors_explained(data, f"reading its {split} pictures"):
            dataset = folders.read_pictures(listed, crop, ray_args)
        dataset = folders.keep_usable(dataset, split, crop, cfg.data.small_pictures, report)
        datasets[split] = folders.repeat(dataset, cfg.data.crops_per_picture) if split == "train" else dataset
    return datasets


def val_samples(cfg: Config, data: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` validation pictures as the network sees them (uint8 (N, H, W, 3), their indices): the
    samples drawn every epoch, and the registered model's input example."""
    if not cfg.data.crop_size:
        return read_split(data, "val", limit=count)
    rows = folders.first_usable(picture_splits(cfg, data)["val"], count, cfg.data.crop_size, cfg.data.small_pictures)
    blobs, names, index = ([row[key] for row in rows] for key in ("image", "name", "index"))
    return crop_batch(blobs, names, index, cfg.data.crop_size, cfg.train.val_seed, epoch=None), np.array(index)


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
    height, width = picture_size(cfg, data)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "data": data,
            "mlflow_run_id": mlflow_run_id,
            "tracking_uri": tracking_uri,
            "height": height,
            "width": width,
            "samples": val_samples(cfg, data, cfg.train.samples),  # rank 0 draws them every epoch
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
    pixels, index = val_samples(cfg, data, 4)
    images = to_float_images(pixels)
    masks = validation_holes(cfg, torch.from_numpy(index), images.shape[-2], images.shape[-1])
    val_tags = {k: f"{v:.4f}" for k, v in state["metrics"].items() if k.startswith("val_")}
    model_uri = tracking.log_model(
        run_id,
        model,
        input_example=model_input(apply_holes(images, masks), masks, model.prefill).numpy(),
        registered_name=cfg.registered_model,
        tags={**val_tags, "epoch": str(state["epoch"]), **scale_tags(model.train_scale)},
        tracking_uri=tracking_uri,
    )
    return model_uri, state


def scale_tags(scale: TrainScale) -> dict[str, str]:
    """The scale a registered version learnt at, as the MLflow UI shows it: the fill path reads it from the
    saved config and shrinks larger holes to it."""
    return {"train_size": f"{scale.size[0]}x{scale.size[1]}", "train_hole_px": f"{scale.hole:g}"}


def finish_run(
    cfg: Config, result: ray.train.Result, run_id: str, run_name: str, data: str, tracking_uri: str
) -> RunResult:
    """Log the best epoch's model (registered) and the curves, then end the MLflow run."""
    best_checkpoint = result.get_best_checkpoint(cfg.train.best_metric, metric_mode(cfg.train.best_metric))
    model_uri, state = log_checkpoint_model(cfg, best_checkpoint, run_id, data, tracking_uri)
    history = tracking.metric_history(run_id, CURVES, tracking_uri=tracking_uri)
    tracking.log_picture(run_id, pictures.curves_figure(history, run_name), "curves.png", tracking_uri=tracking_uri)
    tracking.end_run(run_id, "FINISHED", tracking_uri=tracking_uri)
    val_metrics = {k: float(v) for k, v in state["metrics"].items() if k.startswith("val_")}
    return RunResult(run_id, run_name, model_uri, int(state["epoch"]), val_metrics, int(result.metrics["epoch"]))


def resume_command(job: str, cfg: Config, *args: str) -> str:
    """The command that goes on with a stopped run or study: `job` with `args`, and the flags that find its
    MLflow run (the tracking URI and experiment, where they are not the defaults)."""
    flags = list(args)
    if cfg.tracking.tracking_uri:
        flags += ["--tracking-uri", cfg.tracking.tracking_uri]
    if cfg.tracking.experiment != TrackingConfig.experiment:
        flags += ["--set", f"tracking.experiment={cfg.tracking.experiment}"]
    return shlex.join(["python", job, *flags])


def stopped_by_ctrl_c(err: BaseException) -> bool:
    """Whether `fit()` ended this way because of a Ctrl-C: Ray Train's SIGINT handler aborts its controller,
    then exits (SystemExit) or leaves `fit()` to find the controller gone (RayActorError)."""
    return isinstance(err, KeyboardInterrupt | SystemExit | ray.exceptions.RayActorError)


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
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dashboard_port = sock.getsockname()[1]
        runtime.point_state_api_at_dashboard(dashboard_port)
    # a local Ray started here outlives a Ctrl-C long enough for the driver to mark its MLflow run KILLED
    with runtime.ctrl_c_ignored_by_children():
        try:
            ray.init(address=address or "local", dashboard_port=dashboard_port, log_to_driver=True)
        except (ConnectionError, RuntimeError) as err:
            raise UserError(
                f"no Ray cluster at {address!r} ({str(err).splitlines()[0]}): start one with `ray start --head` "
                "or deploy/local-cluster.sh up, or leave --address unset to run locally"
            ) from None


def prepare_data(cfg: Config) -> str:
    """The data to train on: a picture source as it is (`data.crop_size` set), a prepared dataset, or what
    `prepare` makes of a CIFAR-10 or Parquet source; a local path made absolute, as the workers (which run in
    other folders) read it."""
    source = cfg.data.path or os.environ.get("INPAINT_DATA", "")
    if not source:
        raise UserError(
            "no data given: pass --data DIR (a prepared dataset, a CIFAR-10 source, or a folder of pictures with "
            "--set data.crop_size=N) or set INPAINT_DATA"
        )
    storage.check_bucket(source, f"reading the data {source}")
    located = source if storage.is_uri(source) else os.path.abspath(source)
    if cfg.data.crop_size:
        if is_prepared(source):
            raise UserError(
                f"{source} is a prepared dataset of same-size pictures: train on it without data.crop_size, "
                "or point data.path at the pictures themselves"
            )
        return located
    if is_prepared(source):
        return located
    if folders.holds_picture_files(source):
        raise UserError(
            f"{source} is a folder of pictures: train on crops of them with --set data.crop_size=128 "
            "(any side the model's downsampling divides; configs/photos.yaml is a recipe for photos)"
        )
    if storage.is_uri(source):  # sources are read from local files: a URI can only be a prepared dataset
        raise UserError(
            f"{source} holds no prepared dataset (no manifest.json under it): prepare one there with "
            f"`python jobs/prepare.py --source SRC --out {source}`, or fix the prefix"
        )
    name = os.path.basename(os.path.normpath(source)).split(".")[0] or "data"
    limit = f"-{cfg.data.limit}" if cfg.data.limit else ""
    out = os.path.abspath(cfg.data.prepared or os.path.join("data", f"prepared-{name}{limit}"))
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
    cfg = with_image_size(cfg, data)
    connect_ray(cfg.scaling.address)
    check_cluster_fits(cfg)
    if not resume:
        run_name = cfg.tracking.run_name or f"{cfg.model.variant}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = tracking.start_run(tracking_uri, cfg.tracking.experiment, run_name, cfg.to_dict())
    else:
        tracking.start_run(tracking_uri, cfg.tracking.experiment, run_name, {}, run_id=run_id)  # RUNNING again
    print(f"run {run_name}: MLflow run {run_id} at {tracking_uri}", flush=True)
    try:  # from here on the MLflow run is open: however the job ends, it ends the run
        datasets = read_datasets(cfg, data)
        tag_data_rows(run_id, datasets, tracking_uri)
        result = make_trainer(cfg, data, run_name, run_id, tracking_uri, datasets).fit()
    except ray.train.TrainingFailedError as err:
        cause = failure_cause(err)
        tracking.set_tag(run_id, "failure", cause, tracking_uri=tracking_uri)
        tracking.end_run(run_id, "FAILED", tracking_uri=tracking_uri)
        raise RunFailed(f"run {run_name} failed ({cause}); fix the cause, then --resume {run_name}") from None
    except BaseException as err:  # Ctrl-C, bad data found while reading it, or the driver itself going down
        tracking.end_run(run_id, "KILLED" if stopped_by_ctrl_c(err) else "FAILED", tracking_uri=tracking_uri)
        if not stopped_by_ctrl_c(err):
            raise
        ray.shutdown()  # no more forwarded worker lines: the job's last line is its own
        epochs = tracking.logged_steps(run_id, "val_loss", tracking_uri=tracking_uri)
        done = f"after epoch {epochs[-1]} of {cfg.train.epochs}" if epochs else "before its first epoch ended"
        command = resume_command("jobs/train.py", cfg, "--resume", run_name)
        raise RunStopped(f"run {run_name} {done}; it is KILLED in MLflow; go on with: {command}") from None
    return finish_run(cfg, result, run_id, run_name, data, tracking_uri)
