"""Search spaces: YAML files of config keys, read and checked before any Ray work (tune_spaces/README.md).

    space = load_space("tune_spaces/quick.yaml")        # the file's syntax: keys, primitives, ranges
    cfg = load_config(None, values=space.fixed)
    check_space(space, cfg)                              # every searched value trains on top of cfg
    tune.Tuner(trainable, param_space=space.param_space(), ...)

A key given one of Tune's sampling primitives (`{choice: [...]}`, `{randint: [lo, hi]}`, ...) is
searched; a key given a plain value is the same for every trial. `samples`, `search` (random, or
Optuna's TPE), `early_stopping`, `time_budget_minutes`, `baseline`, and ASHA's clock (`asha_time_attr`:
epochs, or training minutes from `asha_grace_minutes` on) set the study itself.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from inpaint.config import Config, get, with_values
from inpaint.errors import UserError

PRIMITIVES = ("choice", "grid", "randint", "uniform", "loguniform")
SEARCHERS = ("random", "optuna")  # Tune's random/grid sampling, or Optuna's TPE learning from the trials so far
RANGES = ("randint", "uniform", "loguniform")  # written [lo, hi]
# One value per study: the data is prepared once, the cluster and MLflow are shared, and ASHA
# compares trials on the same metric with the same epoch budget.
NOT_SEARCHABLE = ("data.", "scaling.", "tracking.", "train.epochs", "train.best_metric")
HOLE_RANGES = (("masks.min_size", "masks.max_size"), ("masks.min_coverage", "masks.max_coverage"))  # (min, max)
# the widest hole ranges, which no searched value conflicts with
ANY_HOLES = {
    "masks.min_size": 1,
    "masks.max_size": 1_000_000,
    "masks.min_coverage": math.nextafter(0, 1),
    "masks.max_coverage": math.nextafter(1, 0),
}
ASHA_CLOCKS = {"epoch": "epoch", "minutes": "training_minutes"}  # asha_time_attr → the metric ASHA's rungs count


def config_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Every leaf key of the config tree, e.g. `model.mixer_depth`."""
    node = Config() if node is None else node
    keys = []
    for field in fields(node):
        value = getattr(node, field.name)
        name = f"{prefix}{field.name}"
        keys += config_keys(value, f"{name}.") if is_dataclass(value) else [name]
    return keys


CONFIG_KEYS = config_keys()


@dataclass(frozen=True)
class Search:
    """A searched key's sampling primitive and its arguments, as the space file writes them."""

    primitive: str  # one of PRIMITIVES
    args: list  # the values (choice, grid), or [lo, hi], hi included (randint too)

    def domain(self) -> Any:
        """The Tune search domain."""
        match self.primitive:
            case "choice":
                return tune.choice(self.args)
            case "grid":
                return tune.grid_search(self.args)
            case "randint":
                return tune.randint(self.args[0], self.args[1] + 1)  # Tune leaves hi out
            case "uniform":
                return tune.uniform(*self.args)
            case "loguniform":
                return tune.loguniform(*self.args)

    def distribution(self) -> Any:
        """The Optuna distribution of the same values (for importances computed after a study of any searcher)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        match self.primitive:
            case "choice" | "grid":
                return CategoricalDistribution([v if isinstance(v, int | float | str) else str(v) for v in self.args])
            case "randint":
                return IntDistribution(*self.args)
            case _:
                return FloatDistribution(*self.args, log=self.primitive == "loguniform")

    def holds(self, value: Any) -> bool:
        """Whether a study of this search can draw `value`."""
        if self.primitive in RANGES:
            return self.args[0] <= value <= self.args[1]
        return value in self.args

    def __str__(self) -> str:
        return f"{{{self.primitive}: {json.dumps(self.args)}}}"


@dataclass
class Space:
    """A search-space file: the searched keys, the fixed ones, and its default number of samples."""

    path: Path
    searched: dict[str, Search]
    fixed: dict[str, Any]  # config values every trial shares
    samples: int | None = None
    search: str = "random"  # one of SEARCHERS
    early_stopping: bool = True  # ASHA; off, every trial trains every epoch (an ablation's equal budget)
    time_budget_minutes: float | None = None  # then Tune stops the trials under way and starts no more
    baseline: bool = False  # the first trial is the config the study starts from, to judge the others against
    asha_time_attr: str = "epoch"  # ASHA compares trials at equal epochs, or at equal training minutes
    asha_grace_minutes: float | None = None  # with minutes: the first rung (then ×4, up to the time budget)

    @property
    def name(self) -> str:
        return self.path.stem

    def param_space(self) -> dict[str, Any]:
        return {key: search.domain() for key, search in self.searched.items()}

    def baseline_point(self, cfg: Config) -> dict[str, Any]:
        """The searched keys' values in `cfg`: the baseline trial's."""
        return {key: get(cfg, key) for key in self.searched}

    def asha_rungs(self, epochs: int) -> tuple[str, float, float]:
        """ASHA's clock (the reported metric it reads), its first rung and its `max_t`: epochs 1, 4, 16 …
        up to `train.epochs`, or training minutes G, 4G, 16G … up to the time budget (no trial trains longer)."""
        if self.asha_time_attr == "minutes":
            grace = self.asha_grace_minutes  # (--time-budget may set a budget below it: then no trial reaches it)
            return ASHA_CLOCKS["minutes"], grace, max(self.time_budget_minutes, grace)
        return ASHA_CLOCKS["epoch"], 1, epochs

    def bounds(self, key: str, cfg: Config) -> tuple[Any, Any]:
        """The smallest and the largest value `key` takes in a study on top of `cfg`."""
        values = self.searched[key].args if key in self.searched else [get(cfg, key)]
        return min(values), max(values)

    def widest_holes(self, cfg: Config) -> list[Config]:
        """`cfg` with the smallest hole min_size and the largest max_size of the study, once for each hole
        family it draws (each fits the images its own way)."""
        lowest, highest = self.bounds("masks.min_size", cfg)[0], self.bounds("masks.max_size", cfg)[1]
        kinds = self.searched["masks.kind"].args if "masks.kind" in self.searched else [cfg.masks.kind]
        return [
            with_values(cfg, {"masks.kind": kind, "masks.min_size": lowest, "masks.max_size": highest})
            for kind in kinds
        ]


def load_space(path: str | os.PathLike) -> Space:
    """Read a search-space file; a UserError names the first bad key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space not found: {path}; pass a YAML file (see tune_spaces/)")
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"search space {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(entries, dict):
        raise UserError(
            f"search space {path} must map config keys to values, e.g. model.mixer_depth: {{randint: [1, 8]}}"
        )
    samples = entries.pop("samples", None)
    if isinstance(samples, bool) or not isinstance(samples, int | None) or (samples is not None and samples < 1):
        raise UserError(f"{path}: samples must be a positive integer, got {samples!r}")
    early_stopping = entries.pop("early_stopping", True)
    if not isinstance(early_stopping, bool):
        raise UserError(f"{path}: early_stopping must be true or false, got {early_stopping!r}")
    baseline = entries.pop("baseline", False)
    if not isinstance(baseline, bool):
        raise UserError(f"{path}: baseline must be true or false, got {baseline!r}")
    budget = entries.pop("time_budget_minutes", None)
    if isinstance(budget, bool) or not isinstance(budget, int | float | None) or (budget is not None and budget <= 0):
        raise UserError(f"{path}: time_budget_minutes must be a positive number of minutes, got {budget!r}")
    search = entries.pop("search", "random")
    if search not in SEARCHERS:
        raise UserError(f"{path}: search must be one of {', '.join(SEARCHERS)}, got {search!r}")
    clock, grace = asha_clock(path, entries, early_stopping, budget)
    searched, fixed = {}, {}
    for key, value in entries.items():
        key = str(key)
        if key not in CONFIG_KEYS:
            close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see inpaint/config.py for the keys"
            raise UserError(f"{path}: unknown config key {key!r}; {hint}")
        if not isinstance(value, dict):
            fixed[key] = value
            continue
        if key.startswith(NOT_SEARCHABLE):
            raise UserError(f"{path}: {key} cannot be searched (one value per study): give it a plain value")
        searched[key] = parse_search(f"{path}: {key}", value)
    if not searched:
        raise UserError(f"{path} searches nothing: give at least one key a primitive, e.g. {{choice: [3, 5]}}")
    gridded = [key for key, search_ in searched.items() if search_.primitive == "grid"]
    if search == "optuna" and gridded:
        raise UserError(
            f"{path}: {gridded[0]} is a grid, which Optuna cannot search (it samples): "
            "make it a choice, or use search: random"
        )
    return Space(path, searched, fixed, samples, search, early_stopping, budget, baseline, clock, grace)


def asha_clock(path: Path, entries: dict, early_stopping: bool, budget: float | None) -> tuple[str, float | None]:
    """`asha_time_attr` and `asha_grace_minutes`, popped from the file's entries and checked."""
    clock = entries.pop("asha_time_attr", "epoch")
    grace = entries.pop("asha_grace_minutes", None)
    if clock not in ASHA_CLOCKS:
        raise UserError(f"{path}: asha_time_attr must be one of {', '.join(ASHA_CLOCKS)}, got {clock!r}")
    if clock == "epoch":
        if grace is not None:
            raise UserError(f"{path}: asha_grace_minutes needs asha_time_attr: minutes (epochs' first rung is 1)")
        return clock, None
    if not early_stopping:
        raise UserError(f"{path}: asha_time_attr: minutes sets ASHA's rungs, but early_stopping: false turns it off")
    if isinstance(grace, bool) or not isinstance(grace, int | float) or grace <= 0:
        raise UserError(
            f"{path}: asha_time_attr: minutes needs asha_grace_minutes, the first rung in training minutes "
            f"(a positive number, e.g. 10), got {grace!r}"
        )
    if budget is None or grace >= budget:
        raise UserError(
            f"{path}: asha_time_attr: minutes needs a time_budget_minutes above asha_grace_minutes ({grace:g}): "
            f"its rungs go up to the budget, got {budget!r}"
        )
    return clock, float(grace)


def parse_search(where: str, value: dict) -> Search:
    """One `{primitive: args}` mapping; `where` (file and key) starts every error."""
    if len(value) != 1:
        raise UserError(f"{where} must be a plain value or one of {', '.join(PRIMITIVES)}, got {value}")
    ((primitive, args),) = value.items()
    if primitive not in PRIMITIVES:
        raise UserError(f"{where}: unknown primitive {primitive!r}; use one of {', '.join(PRIMITIVES)}")
    if not isinstance(args, list) or not args:
        raise UserError(f"{where}: {primitive} needs a non-empty list, got {args!r}")
    if primitive not in RANGES:
        return Search(primitive, args)
    if len(args) != 2:
        raise UserError(f"{where}: {primitive} needs [lo, hi], got {args!r}")
    if primitive == "randint":
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            raise UserError(f"{where}: randint needs integers [lo, hi], got {args!r}")
        lo, hi = args
    else:
        try:  # floats, as Tune samples them (YAML reads 1e-4, without a dot, as a string)
            lo, hi = (float(a) for a in args)
        except (TypeError, ValueError):
            raise UserError(f"{where}: {primitive} needs numbers [lo, hi], got {args!r}") from None
    if lo >= hi:
        raise UserError(f"{where}: empty range [{lo}, {hi}]: lo must be below hi (a plain value fixes the key)")
    if primitive == "loguniform" and lo <= 0:
        raise UserError(f"{where}: loguniform needs 0 < lo, got {lo}")
    return Search(primitive, [lo, hi])


def check_space(space: Space, cfg: Config) -> None:
    """Refuse a space that cannot train on top of `cfg`, naming the key: every choice and both ends of
    every range must be valid config values, and every hole min_size (min_coverage) at most every max_size
    (max_coverage)."""
    for key, search in space.searched.items():
        for value in search.args:
            try:  # on holes that fit any value, so that only the value itself can fail
                with_values(cfg, {**ANY_HOLES, key: value})
            except UserError as err:
                raise UserError(f"{space.path}: {key} = {value!r} cannot train: {err}") from None
    if space.baseline:
        for key, value in space.baseline_point(cfg).items():
            if not space.searched[key].holds(value):
                raise UserError(
                    f"{space.path}: baseline: true starts from {key} = {value!r}, which {space.searched[key]} "
                    "cannot draw: widen the search, set the key's starting value, or drop baseline"
                )
    for low, high in HOLE_RANGES:
        _, highest_min = space.bounds(low, cfg)
        lowest_max, _ = space.bounds(high, cfg)
        if highest_min > lowest_max:
            raise UserError(
                f"{space.path}: {low} reaches {highest_min} but {high} goes down to {lowest_max}: keep every "
                f"{low} at most every {high}: ranges that meet at most, e.g. [4, 8] and [8, 16]"
            )
