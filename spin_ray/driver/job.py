"""The driver's side of a run: start the coordinator actor and follow it on the console."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray

from spin_ray.cluster import ActorLost, on_this_node
from spin_ray.config import Config
from spin_ray.driver.console import Console
from spin_ray.loop.coordinator import Coordinator
from spin_ray.rundir import unlock
from spin_ray.stages import Prepared


def run_job(
    cfg: Config, prepared: Prepared, console: Console | None = None, marks: dict[str, float] | None = None
) -> dict[str, Any]:
    """Runs the coordinator actor, draws its progress and returns its summary."""
    console = console or Console(Path(cfg.run.output_dir), tty=False)
    coordinator = start_coordinator(cfg, prepared, marks)
    try:
        return console.follow(coordinator.run.remote(), coordinator.progress_since.remote)
    except ray.exceptions.RayActorError as e:
        if isinstance(e, ray.exceptions.RayTaskError):  # the coordinator's own error, of that type
            raise
        raise ActorLost(["the coordinator actor"]) from e
    finally:
        ray.kill(coordinator)  # its run has ended: its processes (and the engines it owns) go now, not when GC says
        unlock(Path(cfg.run.output_dir))  # the next job on this dir (a resume) may start


def start_coordinator(cfg: Config, prepared: Prepared, marks: dict[str, float] | None = None) -> ray.actor.ActorHandle:
    """The coordinator actor on the driver's node (the head, under `ray job submit`), so it needs
    no GPU node to exist. The W&B key is a constructor argument, not in the actor's runtime_env:
    Ray hands a runtime_env's variables to every process the actor starts (the engines, the train
    workers, Ray Data's tasks)."""
    key = os.environ.get("WANDB_API_KEY")
    if cfg.run.wandb_mode == "auto":  # decided here, where the key is
        cfg = cfg.model_copy(deep=True)
        cfg.run.wandb_mode = "online" if key else "offline"
    # Two threads: `run` works while the driver's console polls `progress_since`.
    actor = ray.remote(num_cpus=0, max_concurrency=2, scheduling_strategy=on_this_node())(Coordinator)
    return actor.remote(cfg, prepared, marks, key if cfg.run.wandb_mode == "online" else None)
