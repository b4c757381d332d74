"""The one place that knows a run directory's layout (`run.output_dir`):

    config.yaml  data_fingerprint  data/train.parquet     what the run is: settings and data
    inputs_fingerprint.json                                the start model's files and the eval data
    iter_<t>/pairs/part-*.parquet                          (x, y, y') sampled from p_{t-1}
    iter_<t>/model/  iter_<t>/DONE                         p_t as a HF checkpoint; DONE marks t finished
    iter_<t>/pairs.tmp  prompts.tmp  model.tmp             work in progress (removed or completed on resume)
    metrics.jsonl  events.jsonl  summary.json  report.html  logs/  wandb_run_id  ray_train/
    run.lock                                               the job using it now: host, pid (see `lock`)

Every file that must never be read half-written goes through `write_atomic`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

ITERATION = re.compile(r"iter_(\d+)$")
TMP = ("pairs.tmp", "prompts.tmp", "model.tmp", "model.old")  # an iteration's work in progress


def write_atomic(path: Path, text: str) -> None:
    """Whole or not at all, also across a power cut: temp file, fsync, rename, fsync the dir."""
    # Named by process and thread: two writers of one file (the report) never share a temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class RunDirBusy(RuntimeError):
    """Another job is using the run directory."""


HEARTBEAT_S = 10.0  # the lock's holder touches it this often; one silent for 6 beats is stale


def replace_dir(new: Path, final: Path) -> None:
    """Puts the complete directory `new` at `final`, where an older copy may be (one left by an
    export or merge whose iteration is being redone). The old copy is moved aside first and
    removed last, so a complete one is on disk throughout (and back at `final` if the rename in
    fails): removing it first left a restarted train group nothing to load."""
    old = final.with_name(final.name + ".old")
    if old.exists() and not final.exists():  # a crash between the two renames below
        old.rename(final)
    shutil.rmtree(old, ignore_errors=True)  # a removal cut short
    if final.exists():
        final.rename(old)
    try:
        new.rename(final)
    except BaseException:
        if old.exists():
            old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def lock(root: Path) -> None:
    """Claims `root` for this process until it exits: a second job on the same run dir would
    remove the first one's work in progress and write over its files. A lock whose holder is
    gone (its pid is not running on this host, or, from another host, it stopped beating) is
    taken over, so a killed job's rerun is never refused."""
    path, me = root / "run.lock", {"host": socket.gethostname(), "pid": os.getpid()}
    root.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _holder(path)
            if holder == me:
                return  # this process holds it already (a second run in one process)
            if holder is not None:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
                raise RunDirBusy(
                    f"{root} is in use by another job: pid {holder['pid']} on host {holder['host']}, since {since}. "
                    "Wait for it to end or stop it, or choose another run.output_dir "
                    f"(if that job is gone, remove {path})."
                ) from None
            path.unlink(missing_ok=True)  # stale
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me | {"since": time.time()}, f)
        break

    def beat() -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            try:
                os.utime(path)
            except OSError:
                return

    threading.Thread(target=beat, name="run-lock", daemon=True).start()


def unlock(root: Path) -> None:
    """Gives the run dir up, if this process holds it (the job ended)."""
    path = root / "run.lock"
    if _holder(path) == {"host": socket.gethostname(), "pid": os.getpid()}:
        path.unlink(missing_ok=True)


def _holder(path: Path) -> dict | None:
    """Who holds the lock, or None if nobody does any more."""
    try:
        age = time.time() - path.stat().st_mtime
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # being written by a job starting this instant, or torn by a crash
        holder = {"host": "?", "pid": "?"}
    if holder.get("host") == socket.gethostname():
        if holder["pid"] == os.getpid():
            return {"host": holder["host"], "pid": holder["pid"]}
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # running, as another user
        return holder
    return holder if age < 6 * HEARTBEAT_S else None


def iteration_of(path: str | Path) -> int | None:
    """t of an `iter_<t>` dir or of anything inside one (`.../iter_<t>/model`); None elsewhere."""
    for part in reversed(Path(path).parts):
        if found := ITERATION.match(part):
            return int(found.group(1))
    return None


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.fingerprint = self.root / "data_fingerprint"
        self.inputs = self.root / "inputs_fingerprint.json"  # the start model's files and the eval data
        self.train_data = self.root / "data" / "train.parquet"
        self.metrics = self.root / "metrics.jsonl"
        self.events = self.root / "events.jsonl"
        self.summary = self.root / "summary.json"
        self.report = self.root / "report.html"
        self.logs = self.root / "logs"
        self.wandb_id = self.root / "wandb_run_id"
        self.ray_train = self.root / "ray_train"

    def iteration(self, t: int) -> Path:
        return self.root / f"iter_{t}"

    def pairs(self, t: int) -> Path:
        return self.iteration(t) / "pairs"

    def pairs_tmp(self, t: int) -> Path:
        """Iteration t's pairs while they are made; renamed to `pairs` once all are stored."""
        return self.iteration(t) / "pairs.tmp"

    def prompts_tmp(self, t: int) -> Path:
        """Iteration t's prompts in their seeded order, as batch files (removed after t)."""
        return self.iteration(t) / "prompts.tmp"

    def model(self, t: int) -> Path:
        return self.iteration(t) / "model"

    def done(self, t: int) -> Path:
        """Iteration t's marker: p_t is exported and its global step stored."""
        return self.iteration(t) / "DONE"

    def iterations(self) -> list[int]:
        """Every t with an `iter_<t>` dir, in order."""
        return sorted(t for d in self.root.glob("iter_*") if (t := iteration_of(d)) is not None)

    def finished(self) -> list[int]:
        """Every t whose DONE marker is there, in order."""
        return [t for t in self.iterations() if self.done(t).exists()]

    def mark_done(self, t: int, global_step: int) -> None:
        write_atomic(self.done(t), json.dumps({"global_step": global_step}))

    def global_step(self, t: int) -> int:
        """The global step stored with iteration t's DONE marker."""
        return json.loads(self.done(t).read_text())["global_step"]
