"""What the user sees: a short header, one progress display per phase, the results table.

Everything else the libraries print (vLLM, Ray Data, DeepSpeed, Ray Train, warnings) goes to
`run.output_dir/logs/`, one file per process, by a Ray worker setup hook that points the process's
stdout and stderr there. The coordinator keeps a `Progress` record that the driver polls and draws:
a live bar per phase in a terminal, a plain line every `PLAIN_EVERY_S` otherwise (`ray job submit`,
CI, redirected output). Faults reach the console from `events.jsonl`, which the driver follows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray

from spin_ray.config import Config

LOG_DIR_ENV = "SPIN_RAY_LOG_DIR"
PLAIN_EVERY_S = 30.0  # how often a phase reports when the console cannot redraw a line


def capture_output() -> None:
    """Ray worker setup hook: this process's stdout and stderr go to the run's log directory.

    At the file-descriptor level, so C++ warnings (vLLM, DeepSpeed op builds, Ray core) land there too.
    A node that cannot write there (no shared storage) keeps Ray's own per-worker log files."""
    log_dir = os.environ.get(LOG_DIR_ENV)
    if not log_dir:
        return
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(log_dir) / f"worker-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return
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


class Progress:
    """The coordinator's account of what it is doing; `read` hands the driver what is new.

    Lines also go to stdout, which is the coordinator's log file, so the logs hold them too."""

    def __init__(self, iterations: int):
        self.iterations = iterations
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.seconds: dict[int, dict[str, float]] = {}  # iteration -> {"time/<phase>_s": wall seconds}

    def _add(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._events.append({"time": time.time()} | event)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self._add({"kind": "line", "text": text})

    @contextlib.contextmanager
    def phase(self, t: int, name: str, total: int | None, unit: str) -> Iterator[Callable[..., None]]:
        """One phase of iteration t (0 = the start model); yields `advance(done, total=None)`.
        Phases may overlap (generation, training and evaluation run side by side)."""
        label = f"[{t}/{self.iterations}] {name}"
        self._add({"kind": "phase", "label": label, "total": total, "unit": unit})
        state = {"done": 0, "total": total}
        tick = time.perf_counter()

        def advance(done: int, total: int | None = None) -> None:
            state["done"], state["total"] = done, total or state["total"]
            self._add({"kind": "advance", "label": label, "done": done, "total": state["total"]})

        try:
            yield advance
        finally:
            self._add({"kind": "end", "label": label, "done": state["done"], "total": state["total"]})
            self.seconds.setdefault(t, {})[f"time/{name}_s"] = time.perf_counter() - tick

    def read(self, since: int) -> list[dict[str, Any]]:
        with self._lock:
            return self._events[since:]


class Console:
    """Draws the coordinator's progress in the driver, where stdout is the user's terminal."""

    def __init__(self, out_dir: Path, tty: bool | None = None):
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.events_file = out_dir / "events.jsonl"
        # Bytes of events.jsonl already shown: a resumed run's old faults stay quiet.
        self._events_read = self.events_file.stat().st_size if self.events_file.exists() else 0
        self._bars: dict[str, Any] = {}  # label -> tqdm bar, in a terminal
        self._phases: dict[str, dict[str, Any]] = {}  # label -> what its plain lines need

    def follow(self, done: ray.ObjectRef, read: Callable[[int], ray.ObjectRef]) -> Any:
        """Draws progress until `done` is ready; returns its value (or raises its error)."""
        cursor = 0
        while True:
            finished = bool(ray.wait([done], timeout=0.5)[0])
            with contextlib.suppress(ray.exceptions.RayError):  # a dead coordinator: ray.get says why
                events = ray.get(read(cursor))
                cursor += len(events)
                for event in events:
                    self._draw(event)
            self._faults()
            if finished:
                for label in list(self._bars):
                    self._close_bar(label)
                return ray.get(done)

    def line(self, text: str) -> None:
        if self._bars:
            next(iter(self._bars.values())).write(text)
        else:
            print(text, flush=True)

    def _draw(self, event: dict[str, Any]) -> None:
        kind, label = event["kind"], event.get("label")
        if kind == "line":
            self.line(event["text"])
        elif kind == "phase":
            self._phases[label] = {"unit": event["unit"], "start": event["time"], "said": 0.0}
            if self.tty:
                from tqdm import tqdm

                self._bars[label] = tqdm(
                    total=event["total"], desc=label, unit=event["unit"], file=sys.stdout, position=len(self._bars)
                )
        elif kind == "advance":
            bar, phase = self._bars.get(label), self._phases[label]
            if bar is not None:
                bar.total = event["total"]
                bar.update(event["done"] - bar.n)
            elif event["time"] - phase["start"] - phase["said"] >= PLAIN_EVERY_S:
                phase["said"] = event["time"] - phase["start"]
                print(self._plain(phase, event, finished=False), flush=True)
        elif kind == "end":
            phase, bar = self._phases.pop(label), self._bars.get(label)
            if bar is not None:
                bar.total = event["total"] or event["done"]
                bar.update(event["done"] - bar.n)
                self._close_bar(label)
            else:
                print(self._plain(phase, event, finished=True), flush=True)

    @staticmethod
    def _plain(phase: dict[str, Any], event: dict[str, Any], finished: bool) -> str:
        elapsed = max(event["time"] - phase["start"], 1e-9)
        done, total, unit = event["done"], event["total"], phase["unit"]
        label = f"{event['label']:<18}"
        if not done:  # a phase without counts (start-up, export)
            return f"{label} {'done in' if finished else 'running for'} {_duration(elapsed)}"
        count, rate = f"{done}/{total} {unit}" if total else f"{done} {unit}", f"{done / elapsed:.1f} {unit}/s"
        if finished:  # a rate of a handful (1 engine synced) says nothing
            return f"{label} {count} in {_duration(elapsed)}" + (f" ({rate})" if done >= 10 else "")
        eta = f", ETA {_duration((total - done) * elapsed / done)}" if total else ""
        return f"{label} {count}, {rate}{eta}"

    def _close_bar(self, label: str) -> None:
        self._bars.pop(label).close()

    def _faults(self) -> None:
        """Faults and recoveries, as `events.jsonl` records them (engines are replaced in their
        own actor, so this file, not the coordinator, is where every one of them is written)."""
        if not self.events_file.exists():
            return
        with self.events_file.open("rb") as f:
            f.seek(self._events_read)
            new = f.read()
        complete = new[: new.rfind(b"\n") + 1]  # a line being written is read next time
        self._events_read += len(complete)
        for raw in complete.decode().splitlines():
            event = json.loads(raw)
            details = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("time", "kind"))
            self.line(f"[fault] {event['kind']}: {details}")


def header(cfg: Config, prepared: Any) -> str:
    """What runs where, before anything starts."""
    g, t, out = cfg.generation, cfg.train, Path(cfg.run.output_dir)
    device = f"{g.tensor_parallel_size * g.num_gpus:g} GPU" if g.num_gpus else f"{g.num_cpus:g} CPU"
    where = f", on `{g.resource}` nodes" if g.resource else ""
    reference = "a frozen copy in the trainer" if cfg.spin.reference == "model" else "scored by the engines"
    from spin_ray.plan import ray_address

    ray_at = ray_address(cfg) or "a local Ray started by this job"
    rows = {
        "model": f"{prepared.model_path} ({cfg.model.dtype})",
        "data": f"{prepared.train.records} training prompts, {len(prepared.eval)} held-out",
        "spin": f"{cfg.spin.iterations} iterations, beta {cfg.spin.beta}, reference p_(t-1): {reference}",
        "engines": f"{g.num_engines} x vLLM, {device} each{where}",
        "training": f"{t.num_workers} x Ray Train worker, {'1 GPU' if t.use_gpu else f'{t.num_cpus:g} CPU'} each"
        + (f", on `{t.resource}` nodes" if t.resource else "")
        + f", DeepSpeed ZeRO-{t.zero_stage}",
        "ray": ray_at,
        "output": str(out),
        "logs": f"{out / 'logs'}" + ("" if cfg.run.verbose else " (library output; --verbose shows it here)"),
    }
    return "spin-ray\n" + "\n".join(f"  {k:<9} {v}" for k, v in rows.items())


TABLE = {  # column -> metrics key, for the per-iteration line and the final table
    "loss": "train/loss",
    "reward_acc": "train/rewards/accuracies",
    "margin": "train/rewards/margins",
    "eval_logp": "eval/logps/real",
    "eval_acc": "eval/accuracy",
    "seconds": "time/iteration_s",
}


def iteration_line(row: dict[str, Any], iterations: int) -> str:
    cells = [f"{name} {row[key]:.4f}" for name, key in TABLE.items() if key in row and name != "seconds"]
    return f"[{row['iteration']}/{iterations}] done in {_duration(row['time/iteration_s'])}: " + "  ".join(cells)


def table(history: list[dict[str, Any]]) -> str:
    """One row per iteration; the first row is the model the run started from (p_0, or the
    resumed model)."""
    lines = [f"{'iter':>6}" + "".join(f"{name:>12}" for name in TABLE)]
    for row in history:
        label = "start" if row is history[0] else str(row["iteration"])
        lines.append(f"{label:>6}" + "".join(f"{row[k]:>12.4f}" if k in row else f"{'-':>12}" for k in TABLE.values()))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
