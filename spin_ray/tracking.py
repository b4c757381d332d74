"""Metrics to `metrics.jsonl` (always) and W&B (one run per job; offline without an API key)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from spin_ray.config import Config
from spin_ray.rundir import RunDir, write_atomic


class Tracker:
    def __init__(self, cfg: Config, output_dir: Path, resume_from: int = 0):
        self.root, self.path = output_dir, RunDir(output_dir).metrics
        if self.path.exists():  # lines of an iteration that did not finish are logged again
            kept = [line for line in read_metrics(output_dir) if line.get("iteration", -1) < resume_from]
            write_atomic(self.path, "".join(json.dumps(line) + "\n" for line in kept))
        self.run = None
        mode = cfg.run.wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=cfg.run.wandb_project,
                dir=str(output_dir),
                mode=mode,
                config=cfg.model_dump(),
                name=output_dir.name,
                # resume="allow" + a stable id: a resumed job continues the same W&B run.
                id=_run_id(output_dir),
                resume="allow",
                settings=wandb.Settings(console="off", silent=True),
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step} | metrics) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def has_row(self, t: int) -> bool:
        """Whether iteration t's row (p_t's evaluation; t = 0: the start model's) is logged."""
        lines = read_metrics(self.root) if self.path.exists() else []
        return any(line.get("iteration") == t and is_row(line) for line in lines)

    def finish(self) -> None:
        if self.run is not None:
            import wandb

            self.run.finish()
            # Stop W&B's service process now: at actor exit Ray kills it before wandb's atexit hook
            # can say goodbye, which prints a ConnectionResetError traceback.
            wandb.teardown()


def _run_id(output_dir: Path) -> str:
    id_file = RunDir(output_dir).wandb_id
    if not id_file.exists():
        write_atomic(id_file, uuid.uuid4().hex[:12])
    return id_file.read_text().strip()


def read_metrics(output_dir: str | Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """The lines of `metrics.jsonl`; one the job died while writing is left out (and noted in
    `problems`), so a crashed run still resumes, reports and compares."""
    lines = []
    for n, line in enumerate(RunDir(output_dir).metrics.read_text().splitlines(), 1):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            if problems is not None:
                problems.append(f"metrics.jsonl line {n} is not JSON; left out")
    return lines


def is_row(line: dict[str, Any]) -> bool:
    """An iteration's row carries its global step; the start model's has no train/ keys; the
    per-step training lines have train/ keys only."""
    return "global_step" in line or not any(key.startswith("train/") for key in line)


def record_event(output_dir: str | Path, kind: str, **fields: Any) -> None:
    """Appends one fault or recovery to `events.jsonl`: what failed, when, how long recovery took."""
    with RunDir(output_dir).events.open("a") as f:
        f.write(json.dumps({"time": time.time(), "kind": kind} | fields) + "\n")
