"""Where things run on the Ray cluster: the node a head-pinned actor stays on, free ports, the
cluster a job joins and the size of the local Ray it starts otherwise."""

from __future__ import annotations

import math
import os
import socket
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


def free_port() -> int:
    """A free port from the OS's ephemeral range, outside Ray's worker ports."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in RAY_WORKER_PORTS:
            return port


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
