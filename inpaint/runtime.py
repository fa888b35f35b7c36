"""Process-wide settings, in one place: every job calls `configure_process()` first, and so does every
Ray Train worker (on a cluster it is a process of its own). Importing the library changes nothing.
"""

from __future__ import annotations

import os

import ray.data

# Setting → value, applied unless the user has set the variable already.
ENVIRONMENT = {
    # MLflow's HTTP client retries a failed request 7 times with exponential backoff, about 4 minutes.
    # A tracking-server restart should stall training for about a minute at most before
    # `tracking.log_metrics` buffers instead: 6 retries with factor 1 wait 0, 2, 4, 8, 16, 32 s.
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
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    ray.data.DataContext.get_current().enable_progress_bars = False
