"""Where each process's output goes: one log file per process under `run.output_dir/logs/`
(and `serve.log`, `evaluate.log` for the scripts beside the job).

What the libraries print (vLLM, Ray Data, DeepSpeed, Ray Train, warnings) goes there by a Ray
worker setup hook that points the process's stdout and stderr at a file; the file is renamed
after the process's role (`engine-<pid>.log`, `train-rank0-<pid>.log`) once it knows it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

LOG_DIR_ENV = "SPIN_RAY_LOG_DIR"


def capture_output() -> None:
    """Ray worker setup hook: this process's stdout and stderr go to the run's log directory.

    At the file-descriptor level, so C++ warnings (vLLM, DeepSpeed op builds, Ray core) land there too.
    A node that cannot write there (no shared storage) keeps Ray's own per-worker log files."""
    log_dir = os.environ.get(LOG_DIR_ENV)
    if log_dir:
        with contextlib.suppress(OSError):
            _output_to(Path(log_dir) / f"worker-{os.getpid()}.log")


def console_to_log(path: Path, name: str) -> tuple[Callable[[str], None], Path]:
    """For the scripts beside the job (serving, evaluation), given the run or model dir they read:
    from here on what the libraries print (Serve's deployment dumps, Ray Data's progress, vLLM,
    C++ warnings) goes to a run dir's logs/<name>.log (a temp file for a model dir, or a run dir
    this user cannot write). Returns (what prints the script's own lines on the terminal, the log)."""
    console = os.fdopen(os.dup(1), "w", buffering=1)
    say = functools.partial(print, file=console, flush=True)
    if (path / "config.yaml").exists():
        with contextlib.suppress(OSError):
            _output_to(path / "logs" / f"{name}.log")
            return say, path / "logs" / f"{name}.log"
    temp = Path(tempfile.gettempdir()) / f"spin-ray-{os.getuid()}" / f"{name}-{os.getpid()}.log"  # the user's own
    _output_to(temp)
    return say, temp


def error_line(e: BaseException) -> str:
    """A script's console line for an error it did not expect; the traceback goes to the log."""
    traceback.print_exc()
    return f"error: {type(e).__name__}: " + "\n".join(str(e).splitlines()[:3])


def _output_to(path: Path) -> None:
    """Points this process's stdout and stderr at `path`, at the file-descriptor level."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def name_log(role: str) -> None:
    """Renames this process's log file after what it does (`engine-0-<pid>.log`), so a reader
    finds the engine's or a train rank's log without opening every worker's."""
    log_dir = os.environ.get(LOG_DIR_ENV)
    if log_dir:
        with contextlib.suppress(OSError):
            os.rename(Path(log_dir) / f"worker-{os.getpid()}.log", Path(log_dir) / f"{role}-{os.getpid()}.log")


def log_driver_to(log_dir: Path) -> None:
    """The driver's own library logging (ray.init, Ray Data, warnings) goes to `driver.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / "driver.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    ray_logger = logging.getLogger("ray")  # Ray gives its logger a console handler of its own at import
    ray_logger.handlers.clear()
    ray_logger.propagate = True
    logging.captureWarnings(True)
