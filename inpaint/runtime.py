"""Every process-wide setting, in one place.

- At import, one thing only: `import_torchvision()` (called by `inpaint/__init__.py`) makes torchvision
  importable beside the CPU build of torch, before any module imports torchmetrics, which imports it.
- `configure_process()`: the environment variables and Ray Data's context below. Every job calls it
  first, and so do every Ray Train worker and every Serve replica (on a cluster each is a process of its
  own, started without the job's environment).
- `point_state_api_at_dashboard` and the two Ctrl-C context managers: what the drivers change, and
  only for as long as they say.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

# Setting → value, applied unless the user has set the variable already.
ENVIRONMENT = {
    # A tracking-server restart should stall training for about a minute at most before `tracking.log_metrics`
    # buffers instead (MLflow's default retries wait about 4 minutes): 6 retries with factor 1 wait 0..32 s.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    # MLflow draws a progress bar on stderr for slow artifact downloads: a job's stderr is its one error line
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Fetch artifacts through the tracking server, as deploy/ promises (a node needs its HTTP address only):
    # MLflow 3.17 otherwise fetches a bucket's artifacts straight from the bucket by presigned URLs.
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
    # Ray Train prints each worker line twice (its own copy and Ray's log forwarding): once is enough.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # torch.compile (inpaint.kernels) compiles in this process: a worker holding 1 CPU starts no compiler pool.
    "TORCHINDUCTOR_COMPILE_THREADS": "1",
    # A study's first Ctrl-C goes to `tune.fit_until_ctrl_c`, which stops it cleanly, not to Tune's handler.
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
}


def configure_process() -> None:
    """Apply ENVIRONMENT (where unset) and quiet Ray Data's progress bars (the per-epoch lines say enough)."""
    import ray.data  # late: importing the library must not import Ray

    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    ray.data.DataContext.get_current().enable_progress_bars = False


def point_state_api_at_dashboard(port: int) -> None:
    """Ray Train frees the workers of a stopped Tune trial through Ray's state API, which cannot tell which of
    several Ray instances on one host is ours: point it, in this process and the Ray it starts, at our dashboard."""
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def ctrl_c_ignored_by_children() -> Iterator[None]:
    """Ctrl-C reaches the whole process group: processes started inside this block (a local Ray) inherit an
    ignored SIGINT, so that they outlive the driver long enough for it to end its MLflow runs."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def first_ctrl_c_calls(on_first: Callable[[], None]) -> Iterator[None]:
    """Inside this block the first Ctrl-C calls `on_first` instead of raising; a second one raises at once."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, previous)
        on_first()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------------
# torchvision beside the CPU build of torch
#
# The torchvision wheel the registry serves is a CUDA build; beside CPU torch its C++ ops library fails to
# load, and `import torchvision` then dies registering fake kernels for `torchvision::nms` and `qnms`, ops
# only that library defines. We use none of torchvision's C++ ops, so when the plain import fails for that
# reason we declare the two op schemas ourselves and import again; on a normal install nothing is declared.

_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_stub_library: torch.library.Library | None = None  # kept alive: dropping it would undefine the ops


def import_torchvision() -> ModuleType:
    """Return the `torchvision` module, declaring its missing op schemas first if its C++ library is absent."""
    global _stub_library
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err) or _stub_library is not None:
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _stub_library = torch.library.Library("torchvision", "DEF")
        _stub_library.define("nms" + _NMS_SCHEMA)
        _stub_library.define("qnms" + _NMS_SCHEMA)
        import torchvision
    return torchvision
