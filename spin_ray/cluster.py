"""Where things run on the Ray cluster: the node a head-pinned actor stays on, free ports, the
cluster a job joins and the size of the local Ray it starts otherwise."""

from __future__ import annotations

import math
import os
import random
import socket
from pathlib import Path
from typing import Any

from spin_ray.config import Config

RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default worker ports: a fixed port of ours stays out


def on_this_node() -> Any:
    """Pins an actor to the caller's node (the head, under `ray job submit`): a 0-CPU actor on
    a worker node would not keep that node busy, and the autoscaler would remove it from under
    the actor."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


class ActorLost(RuntimeError):
    """One of the job's head-pinned actors (coordinator, engine pool, trainer channel) died.

    They are not restarted: each owns processes that die with it (the pool its engines, the
    coordinator everything) or state its peers cannot rebuild (the channel's task in hand), and
    resume already restarts a run exactly from what is on disk. So the job stops at once."""

    def __init__(self, names: list[str]):
        super().__init__(
            f"{' and '.join(names)} died, and this job cannot go on without it (see docs/failures.md). "
            "Everything finished is on disk: run the same command to resume."
        )


def dead(actors: dict[str, Any], timeout_s: float = 10.0) -> list[str]:
    """The names of those `actors` (name -> handle) that no longer answer: dead, or frozen."""
    import ray

    refs = {name: actor.__ray_ready__.remote() for name, actor in actors.items()}
    ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    lost = []
    for name, ref in refs.items():
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayError:  # died, or no answer within timeout_s
            lost.append(name)
    return lost


def free_port() -> int:
    """A free port between Ray's worker ports and the OS's ephemeral range. Not in the ephemeral
    range: every outbound connection takes a port from there, so one picked there can be taken
    before its server binds it (a toy job's live endpoint once failed so, a minute after the pick)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:  # not Linux: the IANA range
        low = 49152
    low = max(low, RAY_WORKER_PORTS.stop + 1000)  # a range that low would be ephemeral anyway
    for _ in range(1000):
        port = random.randrange(RAY_WORKER_PORTS.stop, low)
        if not in_use(port):
            return port
    raise RuntimeError(f"no free TCP port in {RAY_WORKER_PORTS.stop}-{low - 1}")


def in_use(port: int, host: str = "") -> bool:
    """Whether a server could not bind `port` on `host` now."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_address() -> tuple[str, int]:
    """This node's IP and a free TCP port, for a rendezvous other nodes connect to."""
    import ray

    return ray.util.get_node_ip_address(), free_port()


def ray_address(cfg: Config) -> str | None:
    """The cluster the job joins (run.ray_address, else RAY_ADDRESS); None: it starts a local Ray."""
    return cfg.run.ray_address or os.environ.get("RAY_ADDRESS")


def local_cpus(cfg: Config) -> int:
    """Logical CPUs of the local Ray jobs/spin.py starts: at least what the job asks for, plus 2
    (engines and train workers mostly wait on each other, and too few slots leave an actor
    pending forever without a word)."""
    g, t = cfg.generation, cfg.train
    return max(os.cpu_count() or 1, math.ceil(g.num_engines * g.num_cpus + t.num_workers * t.num_cpus + 2))


def workers_not_niced() -> None:
    """For a local Ray started next: its workers at the driver's priority. Ray starts workers at
    nice 15 so that its control plane stays responsive on a busy node; on one machine the engines
    and train ranks are the work, and at nice 15 every wake-up of Ray's own processes preempts one
    of their OMP threads while the others wait for it at a barrier (SmolLM2 on 2 cores: a LoRA
    step took 1.15x a plain loop's, 1.035x at nice 0)."""
    os.environ.setdefault("RAY_worker_niceness", "0")


def join_or_start(cfg: Config, num_cpus: int) -> None:
    """For the tools beside the job (serving, evaluation): the cluster of run.ray_address or
    RAY_ADDRESS, else a local Ray of `num_cpus` logical CPUs (a cluster takes no num_cpus)."""
    import ray

    if address := ray_address(cfg):
        ray.init(address=address, log_to_driver=False)
    else:
        workers_not_niced()
        ray.init(num_cpus=num_cpus, log_to_driver=False)
