"""What the user sees: a short header, one progress display per phase, the results table.

Everything else the libraries print (vLLM, Ray Data, DeepSpeed, Ray Train, warnings) goes to
`run.output_dir/logs/`, one file per process (spin_ray.logs). The coordinator keeps a `Progress`
record (spin_ray.loop.progress) that the driver polls and draws:
a live bar per phase in a terminal, a plain line every `PLAIN_EVERY_S` otherwise (`ray job submit`,
CI, redirected output). Faults reach the console from `events.jsonl`, which the driver follows.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from spin_ray.cluster import ray_address
from spin_ray.config import Config
from spin_ray.loop.progress import duration
from spin_ray.rundir import RunDir
from spin_ray.stages import Prepared

PLAIN_EVERY_S = 30.0  # how often a phase reports when the console cannot redraw a line


class Console:
    """Draws the coordinator's progress in the driver, where stdout is the user's terminal."""

    def __init__(self, out_dir: Path, tty: bool | None = None):
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.events_file = RunDir(out_dir).events
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
            return f"{label} {'done in' if finished else 'running for'} {duration(elapsed)}"
        count, rate = f"{done}/{total} {unit}" if total else f"{done} {unit}", f"{done / elapsed:.1f} {unit}/s"
        if finished:  # a rate of a handful (1 engine synced) says nothing
            return f"{label} {count} in {duration(elapsed)}" + (f" ({rate})" if done >= 10 else "")
        eta = f", ETA {duration((total - done) * elapsed / done)}" if total else ""
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


def trains(cfg: Config, params: tuple[int, int]) -> str:
    trainable, total = params
    if not cfg.train.lora:
        return f"every parameter ({total:,})"
    lora = cfg.train.lora
    share = f"{trainable / total:.2%}" if total else "?"
    return f"a LoRA adapter, r={lora.r} on {lora.target_modules}: {trainable:,} of {total:,} parameters ({share})"


def header(cfg: Config, prepared: Prepared) -> str:
    """What runs where, before anything starts."""
    g, t, out = cfg.generation, cfg.train, Path(cfg.run.output_dir)
    device = f"{g.tensor_parallel_size * g.num_gpus:g} GPU" if g.num_gpus else f"{g.cpus_per_engine:g} CPU"
    where = f", on `{g.resource}` nodes" if g.resource else ""
    reference = "a frozen copy in the trainer" if cfg.spin.reference == "model" else "scored by the engines"
    if t.lora and cfg.spin.reference == "model":
        reference = "its adapter, kept aside in the trainer (no second copy of the model)"
    ray_at = ray_address(cfg) or "a local Ray started by this job"
    rows = {
        "model": f"{prepared.model_path} ({cfg.model.dtype})",
        "data": f"{prepared.train.records} training prompts, {len(prepared.eval)} held-out",
        "spin": f"{cfg.spin.iterations} iterations, beta {cfg.spin.beta}, reference p_(t-1): {reference}",
        "engines": f"{g.num_engines} x vLLM, {device} each{where}",
        "training": f"{t.num_workers} x Ray Train worker, {'1 GPU' if t.use_gpu else f'{t.num_cpus:g} CPU'} each"
        + (f", on `{t.resource}` nodes" if t.resource else "")
        + f", DeepSpeed ZeRO-{t.zero_stage}",
        "trains": trains(cfg, prepared.params),
        "ray": ray_at,
        "output": str(out),
        "logs": f"{RunDir(out).logs}" + ("" if cfg.run.verbose else " (library output; --verbose shows it here)"),
    }
    return "spin-ray\n" + "\n".join(f"  {k:<9} {v}" for k, v in rows.items())
