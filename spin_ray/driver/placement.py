"""Where a job's engines and train workers would go: this machine, or a Ray cluster's live nodes
plus what its autoscaler may add, read as a driver without starting anything."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from spin_ray.cluster import local_cpus
from spin_ray.config import Config
from spin_ray.private import autoscaler_cluster_config

GPU_GIB = {"H100": 80, "H200": 141, "H20": 96, "B200": 180, "A100": 40, "A100-40G": 40, "A100-80G": 80}
GPU_GIB |= {"L40S": 48, "L4": 24, "A10G": 24, "V100": 16, "T4": 16}
ASSUMED_GPU_GIB = 80.0
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster config, on the head
UNLIMITED = 1_000_000  # an autoscaler node type without a maximum


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    more: int  # nodes of this type the autoscaler may still add


@dataclass
class Cluster:
    """Where the job could run: live nodes' total resources and what an autoscaler can add."""

    where: str
    nodes: list[dict[str, float]]
    node_types: list[NodeType] = field(default_factory=list)
    max_new_nodes: int = 0
    gpu_gib: float | None = None  # per device; None: not known, ASSUMED_GPU_GIB is used
    gpu_source: str = ""
    host_gib: float | None = None  # this machine's RAM, for a local run's parts on CPU


def local_cluster(cfg: Config) -> Cluster:
    """This machine as jobs/spin.py's local Ray would see it, without starting one."""
    import psutil
    import torch

    cores, cpus = os.cpu_count() or 1, local_cpus(cfg)
    gpus = torch.cuda.device_count()
    ram = psutil.virtual_memory().total / 2**30
    node = {"CPU": float(cpus)} | ({"GPU": float(gpus)} if gpus else {})
    where = f"this machine: {cores} cores ({cpus} logical CPUs for Ray, as jobs/spin.py gives), {gpus} GPUs, "
    where += f"{ram:.1f} GiB RAM"
    if not gpus:
        return Cluster(where, [node], host_gib=ram)
    gib = min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus)) / 2**30
    return Cluster(where, [node], gpu_gib=gib, gpu_source="torch.cuda", host_gib=ram)


def connected_cluster(address: str) -> Cluster:
    """A running cluster's live nodes and its autoscaler's node types, read as a driver."""
    import ray

    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        return Cluster(f"cannot connect to the Ray cluster at {address}: {e}", [])
    try:
        gcs = ray.get_runtime_context().gcs_address
        nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n["Alive"]]
        node_types, max_new, source = autoscaler_node_types(nodes)
    finally:
        ray.shutdown()
    where = f"Ray cluster at {gcs}: {len(nodes)} live node(s) with {res(_sum(nodes, ('CPU', 'GPU')))}"
    if node_types:
        kinds = ", ".join(f"{t.name} x{t.more if t.more < UNLIMITED else 'any'} {res(t.resources)}" for t in node_types)
        where += f"\n{'':13}the autoscaler ({source}) may add {max_new} nodes: {kinds}"
    else:
        where += f"\n{'':13}no autoscaler node types ({source}): only the live nodes count"
    prefix = "accelerator_type:"  # Ray's node resource naming the GPU model
    names = {
        k.removeprefix(prefix) for r in nodes + [t.resources for t in node_types] for k in r if k.startswith(prefix)
    }
    sizes = {name: GPU_GIB[name] for name in names if name in GPU_GIB}
    if not sizes:
        return Cluster(where, nodes, node_types, max_new)
    smallest = min(sizes, key=sizes.__getitem__)
    return Cluster(where, nodes, node_types, max_new, float(sizes[smallest]), f"{prefix}{smallest}")


def autoscaler_node_types(nodes: list[dict[str, float]]) -> tuple[list[NodeType], int, str]:
    """(node types and how many more of each, most new nodes in all, where they were read).

    Ray 2.60 has no public API for this. The GCS holds a ClusterConfig when an autoscaler reports
    one (KubeRay's; Ray Data reads it the same way); a `ray up` cluster keeps its config in
    ~/ray_bootstrap_config.yaml on the head, where `ray job submit` runs the driver."""
    config = autoscaler_cluster_config()
    if config is not None and config.node_group_configs:
        groups = [(c.name, dict(c.resources), c.max_count) for c in config.node_group_configs]
        return *node_types(groups, nodes, None), "GCS cluster config"
    path = Path(BOOTSTRAP_CONFIG).expanduser()
    if path.exists():
        return *launcher_node_types(yaml.safe_load(path.read_text()), nodes), BOOTSTRAP_CONFIG
    return [], 0, f"no GCS cluster config, no {BOOTSTRAP_CONFIG}"


def launcher_node_types(config: dict, nodes: list[dict[str, float]]) -> tuple[list[NodeType], int]:
    """The worker node types of a cluster-launcher config such as cluster.yaml."""
    head = config.get("head_node_type")
    types = config.get("available_node_types", {})
    groups = [(n, s.get("resources", {}), s.get("max_workers", 0)) for n, s in types.items() if n != head]
    cap = config.get("max_workers")
    return node_types(groups, nodes, None if cap is None else max(0, cap - (len(nodes) - 1)))


def node_types(
    groups: list[tuple[str, dict, int]], nodes: list[dict[str, float]], max_new: int | None
) -> tuple[list[NodeType], int]:
    """(name, declared resources, max count or -1) -> node types less the nodes already up. A type
    that declares no resources is left out: they are detected only when such a node starts."""
    kinds = []
    for name, declared, max_count in groups:
        resources = {k: float(v) for k, v in declared.items()}
        if resources:
            running = sum(all(node.get(k) == v for k, v in resources.items()) for node in nodes)
            kinds.append(NodeType(name, resources, UNLIMITED if max_count == -1 else max(0, max_count - running)))
    return kinds, (min(UNLIMITED, sum(t.more for t in kinds)) if max_new is None else max_new)


@dataclass(frozen=True)
class Group:
    name: str
    count: int
    bundle: dict[str, float]


def groups(cfg: Config) -> list[Group]:
    """What the job asks Ray for, as generation.launch_engine and training.Trainer ask."""
    g, t = cfg.generation, cfg.train
    engine = {"CPU": g.cpus_per_engine, "GPU": g.num_gpus * g.tensor_parallel_size, g.resource: 1}
    worker = {"CPU": t.num_cpus, "GPU": 1 if t.use_gpu else 0, t.resource: 1}
    return [Group("engines", g.num_engines, _asked(engine)), Group("workers", t.num_workers, _asked(worker))]


def _asked(resources: dict[str | None, float]) -> dict[str, float]:
    """Without zero amounts and an unset custom resource: Ray is not asked for those."""
    return {k: float(v) for k, v in resources.items() if k and v}


def place(cluster: Cluster, wanted: list[Group]) -> dict[str, tuple[bool, str]]:
    """Per group: (placed, how or why not). First fit, group by group, onto the live nodes, then
    onto nodes the autoscaler may add; a group gets what the groups before it left."""
    free = [dict(n) for n in cluster.nodes]
    more = {t.name: t.more for t in cluster.node_types}
    budget = cluster.max_new_nodes
    outcome: dict[str, tuple[bool, str]] = {}
    for group in wanted:
        left = _sum(free, group.bundle)
        kinds = [t for t in cluster.node_types if _fits(group.bundle, t.resources)]
        addable = [scale(t.resources, min(more[t.name], budget)) for t in kinds]
        could_add = {k: v for k, v in _sum(addable, group.bundle).items() if v}
        added: Counter[str] = Counter()
        for _ in range(group.count):
            node = next((n for n in free if _fits(group.bundle, n)), None)
            if node is None:
                kind = next((t for t in kinds if more[t.name]), None)
                if kind is None or not budget:
                    break
                more[kind.name] -= 1
                budget -= 1
                added[kind.name] += 1
                node = dict(kind.resources)
                free.append(node)
            for k, v in group.bundle.items():
                node[k] -= v
        else:
            grown = ", ".join(f"{n} x{c}" for n, c in added.items())
            outcome[group.name] = (True, f"OK, the autoscaler adds {grown}" if added else "OK")
            continue
        why = f"needs {res(scale(group.bundle, group.count))}, cluster has {res(left)}"
        why += f" + up to {res(could_add)} from the autoscaler" if could_add else ""
        why += f" (left after the {', '.join(outcome)})" if outcome else ""
        every = cluster.nodes + [t.resources for t in cluster.node_types]
        # Nodes with every resource asked for, none with enough of it: the bundle is too big.
        if not any(_fits(group.bundle, n) for n in every) and any(group.bundle.keys() <= n.keys() for n in every):
            why += f"; no node holds one {res(group.bundle)}"
        outcome[group.name] = (False, "WARN: cannot be placed: " + why)
    return outcome


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items())


def scale(resources: dict[str, float], n: float) -> dict[str, float]:
    return {k: v * n for k, v in resources.items()}


def _sum(nodes: list[dict[str, float]], keys) -> dict[str, float]:
    return {k: sum(n.get(k, 0.0) for n in nodes) for k in keys}


def res(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k} {v:g}" for k, v in resources.items()) + "}"
