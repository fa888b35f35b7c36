"""One typed config tree: defaults, then a YAML file, then `key=value` overrides, then flags.

    cfg = load_config("configs/paper.yaml", ["model.fusion=add"], values={"train.epochs": 3})

Every value is checked against its field's type, and unknown keys are refused with the key's name,
so a typo never silently trains the default. The resolved tree is what MLflow logs as params.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from inpaint.errors import UserError
from inpaint.masks import MaskConfig
from inpaint.metrics import LOSSES, VAL_METRICS
from inpaint.models import LEGACY_MODEL, ModelConfig

SMALL_PICTURES = ("skip", "resize")  # `data.small_pictures`: what becomes of a picture smaller than the crop


@dataclass
class DataConfig:
    path: str = ""  # a prepared dataset, or any source jobs/prepare.py takes (default: $INPAINT_DATA)
    prepared: str = ""  # where a source gets prepared (default: data/prepared-<name> in the cwd)
    # quick runs: the first N images, a tenth of them (at most `val`) for validation, the rest for training;
    # from a source or from an already-prepared dataset alike (pictures of any size: the first N of each
    # split's folder, or of the listing a share validates from)
    limit: int | None = None
    val: int = 5000  # validation images split off the training set when a source is prepared
    val_limit: int | None = None  # validate on the first N validation images only
    seed: int = 0  # the train/val split's seed
    image_size: list[int] | None = None  # the training pictures' H, W: filled in by the job from the data
    # Pictures of any size (a folder of JPEG/PNG/WebP files, local or s3://, or Hugging Face Parquet) train on
    # square crops of this side: fresh random ones each epoch, fixed ones for validation (inpaint/data/folders.py)
    crop_size: int | None = None
    crops_per_picture: int = 1  # training crops cut from each picture per epoch
    val_path: str = ""  # the validation pictures (default: a val/ folder in data.path, else a share of its pictures)
    val_share: float = 0.1  # that share, drawn with data.seed
    small_pictures: str = "skip"  # a picture smaller than the crop: "skip" it, or "resize" (enlarge) it to fit


@dataclass
class TrainConfig:
    # The default recipe (docs/results.md): each choice below measured against the paper's in experiments/levers.sh
    epochs: int = 26  # the cosine schedule sized to the hour's budget on the full split (docs/results.md)
    batch_size: int = 32  # per worker
    lr: float = 2e-3
    optimizer: str = "adamw"  # "adam" or "adamw"
    weight_decay: float = 0.01
    schedule: str = "cosine"  # "constant" or "cosine" (per step, after the warm-up)
    warmup_epochs: float = 0.2
    loss: str = "hole_l1"  # one of metrics.LOSSES
    hole_weight: float = 6.0  # for the hole_* losses
    seed: int = 0  # weights and training holes
    val_seed: int = 1234  # the fixed validation holes
    samples: int = 8  # validation images shown in the per-epoch picture
    best_metric: str = "val_psnr_hole"  # picks the epoch whose model is registered
    # "bf16": forward and loss under CPU bf16 autocast (weights, Adam, validation stay fp32); "auto": bf16 where
    # the CPU has native bf16, else fp32 (emulated bf16 is no faster; docs/performance.md has the speed-up)
    precision: str = "auto"
    channels_last: bool = True  # NHWC weights and activations, the layout oneDNN's CPU kernels prefer
    # > 0: keep an exponential moving average of the weights (this decay per step); it is what is validated,
    # pictured and registered, and the raw weights are scored beside it as raw_val_* (docs/results.md)
    ema_decay: float = 0.0


@dataclass
class ScalingConfig:
    workers: int = 2  # Ray Train workers (DDP over gloo)
    cpus_per_worker: float = 1.0  # also each worker's torch thread count (rounded down, at least 1)
    address: str | None = None  # Ray cluster address (default: $RAY_ADDRESS, else a local Ray)
    storage_path: str = "runs"  # checkpoints; every node must reach it (shared folder or URI)
    max_failures: int = 2  # worker failures a run survives by resuming from its last checkpoint


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db
    experiment: str = "inpaint"
    run_name: str | None = None  # default: variant and a timestamp
    registered_model: str | None = None  # default: inpaint-fused-unet / inpaint-unet


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)  # training holes, fresh every batch
    val_masks: MaskConfig = field(default_factory=lambda: MaskConfig(kind="diagonal"))  # fixed holes
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def registered_model(self) -> str:
        default = "inpaint-fused-unet" if self.model.variant == "fused" else "inpaint-unet"
        return self.tracking.registered_model or default

    def validate(self) -> Config:
        """Check the values that do not depend on the data; raise UserError naming the key."""
        checks = [
            ("train.epochs", self.train.epochs >= 1, "must be at least 1"),
            ("train.batch_size", self.train.batch_size >= 1, "must be at least 1"),
            ("train.lr", self.train.lr > 0, "must be positive"),
            ("train.optimizer", self.train.optimizer in ("adam", "adamw"), "must be adam or adamw"),
            ("train.schedule", self.train.schedule in ("constant", "cosine"), "must be constant or cosine"),
            ("train.loss", self.train.loss in LOSSES, f"must be one of {', '.join(LOSSES)}"),
            ("train.best_metric", self.train.best_metric in VAL_METRICS, f"must be one of {', '.join(VAL_METRICS)}"),
            ("train.precision", self.train.precision in ("auto", "fp32", "bf16"), "must be auto, fp32 or bf16"),
            ("train.ema_decay", 0 <= self.train.ema_decay < 1, "must be in [0, 1): 0 is off, e.g. 0.999"),
            ("scaling.workers", self.scaling.workers >= 1, "must be at least 1 (a positive worker count)"),
            ("scaling.cpus_per_worker", self.scaling.cpus_per_worker > 0, "must be positive"),
            ("data.val", self.data.val >= 1, "must be at least 1"),
            ("data.limit", (self.data.limit or 10) >= 10, "must be at least 10 (a tenth of it validates)"),
            ("data.crop_size", (self.data.crop_size or 1) >= 1, "must be a positive number of pixels, e.g. 128"),
            ("data.crops_per_picture", self.data.crops_per_picture >= 1, "must be at least 1"),
            ("data.val_share", 0 < self.data.val_share < 1, "must be between 0 and 1, e.g. 0.1"),
            ("data.small_pictures", self.data.small_pictures in SMALL_PICTURES, "must be skip or resize"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise UserError(f"{key} = {get(self, key)!r} {why}")
        try:
            self.model.validate()
            self.masks.validate(section="masks")
            self.val_masks.validate(section="val_masks")
        except ValueError as err:
            raise UserError(str(err)) from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """`value` as the field's type, or UserError naming the key and the type it wants."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
        origin = typing.get_origin(annotation)
    wrong = UserError(f"{key} must be {getattr(annotation, '__name__', annotation)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise wrong
        return [_coerce(v, item, key) for v in value]
    if annotation is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        return float(value)
    if annotation is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise wrong
        return str(value)
    raise wrong


def _merge(node: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set `values` (a nested dict) on the dataclass `node`, refusing unknown keys."""
    hints = typing.get_type_hints(type(node))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(f"{prefix}{n}" for n in hints)
            raise UserError(f"unknown config key {key!r}; known keys here: {known}")
        current = getattr(node, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{key} is a section: give it a mapping of keys, got {value!r}")
            _merge(current, value, prefix=f"{key}.")
        else:
            setattr(node, name, _coerce(value, hints[name], key))


def _nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} → {"a": {"b": 1}}."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def field_type(key: str) -> Any:
    """The annotation of the config field `key` (e.g. `train.epochs` → int); UserError for an unknown key."""
    node: Any = Config()
    *sections, leaf = key.split(".")
    for depth, name in enumerate([*sections, leaf]):
        hints = typing.get_type_hints(type(node))
        prefix = "".join(f"{s}." for s in sections[:depth])
        if name not in hints:
            known = ", ".join(f"{prefix}{n}" for n in hints)
            raise UserError(f"unknown config key {prefix + name!r}; known keys here: {known}")
        node = getattr(node, name)
        if dataclasses.is_dataclass(node) != (depth < len(sections)):
            kind = "a section: set one of its keys" if dataclasses.is_dataclass(node) else "a value, not a section"
            raise UserError(f"config key {prefix + name!r} is {kind}")
    return hints[leaf]


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` → ("a.b", value), the text read as the field's type: a str field takes the text as it
    is (a path like `runs #1` stays whole), a list field reads YAML ([64, 128, 256]), numbers and
    booleans are parsed strictly (no YAML 1.1 surprises such as 1:30 → 90)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {text!r} is not key=value, e.g. --set model.fusion=add")
    annotation = field_type(key)
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    if type(None) in options:
        annotation = next(a for a in options if a is not type(None))
        # empty unsets any optional key; the words for "none" unset only a non-string one
        if raw.strip() == "" or (annotation is not str and raw.strip().lower() in ("null", "none", "~")):
            return key, None
    wrong = UserError(f"{key} must be {getattr(annotation, '__name__', annotation)}, got {raw!r}")
    if annotation is str:
        return key, raw
    if annotation is bool:
        word = raw.strip().lower()
        if word not in ("true", "false"):
            raise wrong
        return key, word == "true"
    if annotation in (int, float):
        try:
            return key, annotation(raw.strip())
        except ValueError:
            raise wrong from None
    try:  # lists: YAML flow syntax
        return key, yaml.safe_load(raw)
    except yaml.YAMLError:
        raise wrong from None


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    base: dict[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults (or `base`, a saved config), then the YAML file at `path`, then the `key=value` texts of
    `overrides` (as `--set` gives them), then `values` ({"train.epochs": 3}: typed, as flags give them)."""
    cfg = from_dict(base) if base else Config()
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"config file not found: {file}; pass an existing YAML file (see configs/)")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {file} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {file} must hold a mapping of sections, got {type(loaded).__name__}")
        _merge(cfg, loaded)
    _merge(cfg, _nested(dict(map(parse_override, overrides))))
    _merge(cfg, _nested(values or {}))
    return cfg.validate()


def with_values(cfg: Config, values: Mapping[str, Any]) -> Config:
    """A checked copy of `cfg` with these `{"key": value}`s set."""
    return load_config(None, base=cfg.to_dict(), values=values)


def from_dict(values: dict[str, Any]) -> Config:
    """The config a `to_dict()` produced (as stored in checkpoints, logged with a run and sent to workers).

    Every saved config is read back here: a model key it lacks was added after it was saved, and takes the
    value that built its network then (`models.LEGACY_MODEL`), whatever today's default."""
    cfg = Config()
    _merge(cfg, values | {"model": LEGACY_MODEL | values.get("model", {})})
    return cfg


# The flags every job that trains takes, each a shorthand for one config key.
FLAG_KEYS = {
    "data": "data.path",
    "workers": "scaling.workers",
    "limit": "data.limit",
    "address": "scaling.address",
    "tracking_uri": "tracking.tracking_uri",
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--data, --config, --set and the shorthands of FLAG_KEYS; `flag_values` reads the shorthands."""
    parser.add_argument(
        "--data", help="a prepared dataset, or any source jobs/prepare.py takes (default: $INPAINT_DATA)"
    )
    parser.add_argument("--config", help="a YAML config file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config value")
    parser.add_argument("--workers", type=int, help="Ray Train workers, of each trial in a study (scaling.workers)")
    parser.add_argument(
        "--limit", type=int, help="train on the first N images, a tenth of them validating (data.limit, at least 10)"
    )
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite)")


def flag_values(args: argparse.Namespace, **keys: str) -> dict[str, Any]:
    """The flags given (FLAG_KEYS and the job's own `keys`: flag → config key) as typed config values,
    for `load_config(values=...)`: they go in unparsed, after `--set`, so a flag wins over a `--set`."""
    given = {key: getattr(args, flag) for flag, key in (FLAG_KEYS | keys).items()}
    return {key: value for key, value in given.items() if value is not None}
