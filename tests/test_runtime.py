"""Process-wide state lives in inpaint/runtime.py, and does what its docstring says."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from inpaint import runtime

PACKAGE = Path(runtime.__file__).parent


def process_wide_calls(path: Path) -> list[str]:
    """The lines of a module that change process-wide state: os.environ written, signal handlers swapped."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("signal.signal", "os.putenv", "os.environ.update"):
            found.append(f"{path.name}:{node.lineno} {ast.unparse(node)[:60]}")
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Subscript) and ast.unparse(target.value) == "os.environ":
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)[:60]}")
    return found


def test_only_runtime_changes_process_wide_state():
    elsewhere = [line for path in sorted(PACKAGE.rglob("*.py")) if path.name != "runtime.py"
                 for line in process_wide_calls(path)]  # fmt: skip
    assert elsewhere == []


def test_importing_every_module_changes_no_environment_and_no_handler():
    modules = sorted(p.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", ".")
                     for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")  # fmt: skip
    script = (
        "import os, signal, sys\n"
        "before = (dict(os.environ), signal.getsignal(signal.SIGINT))\n"
        f"for name in {modules!r}: __import__(name)\n"
        "after = (dict(os.environ), signal.getsignal(signal.SIGINT))\n"
        "changed = {k for k in before[0].keys() | after[0].keys() if before[0].get(k) != after[0].get(k)}\n"
        "print(sorted(changed), before[1] is after[1])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in runtime.ENVIRONMENT}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    changed = out.stdout.strip().splitlines()[-1]
    # MLflow and Ray may set their own variables at import; none of ours is set by importing
    assert not any(name in changed for name in [*runtime.ENVIRONMENT, "RAY_API_SERVER_ADDRESS"]), changed
    assert changed.endswith("True"), "importing swapped the SIGINT handler"


def test_configure_process_sets_only_what_is_unset(monkeypatch):
    for name in runtime.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # the user's own choice stays
    runtime.configure_process()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == runtime.ENVIRONMENT["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]


def test_the_first_ctrl_c_calls_back_and_the_second_interrupts():
    calls = []
    previous = signal.getsignal(signal.SIGINT)
    with runtime.first_ctrl_c_calls(lambda: calls.append("stop")):
        signal.raise_signal(signal.SIGINT)
        assert calls == ["stop"]
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def ignored_signals(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)


def test_a_process_started_while_ctrl_c_is_ignored_inherits_it():
    sigint = 1 << (signal.SIGINT - 1)
    with runtime.ctrl_c_ignored_by_children():
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    after = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert ignored_signals(child.pid) & sigint
        assert not ignored_signals(after.pid) & sigint  # the driver's own handler is back
    finally:
        child.kill()
        after.kill()


def test_a_ctrl_c_before_any_run_is_one_line_and_exit_130(capsys):
    """Ctrl-C while a job starts up (imports, checks, preparing data): no traceback, one `stopped:` line."""
    from inpaint.errors import cli_errors

    @cli_errors
    def main() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 130 and capsys.readouterr().err == "stopped: Ctrl-C\n"
