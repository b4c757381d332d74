"""An autoscaling Ray cluster on one machine, shaped like `cluster.yaml`, for tests and chaos runs.

Ray's fake multi-node provider starts a "node" (a raylet process on this machine) whenever the
autoscaler asks for one, and removes it when idle: the real autoscaler logic, no cloud. Node
types, their names and custom resources come from `cluster.yaml` itself; GPUs become CPUs and
counts are capped so a node fits here. The head runs on its own ports and temp dir, and every
process it starts carries a marker in its environment, so `stop()` ends exactly those (the
fake nodes' agents are re-parented to init and their command lines do not name the cluster).
Never `ray stop`: it kills every Ray on the machine.

Submit jobs here without `--working-dir`: the fake nodes share one session directory, and a node
that scales down deletes the job's unpacked working_dir, which is every worker's current directory
on every node. Seen here: `os.path.abspath` failing in new actors, and vLLM's compiled sampler
helper failing to build ("'at::vec' has not been declared": inductor's vector-ISA probe fails
without a current directory, then reuses vectorized kernels from the shared cache). Real nodes
each unpack their own copy. The code reaches the fake nodes as the editable install.

    with FakeCluster(Path("/tmp/fc"), Path("cluster.yaml")) as cluster:
        subprocess.run(["ray", "job", "submit", "--address", cluster.dashboard, ...])
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from spin_ray.cluster import free_port

MARKER = "SPIN_RAY_TESTBED"
HEAD = "ray.head.default"


def autoscaler_config(cluster_yaml: Path, gcs_address: str, head_cpus: int, max_per_node: int) -> dict[str, Any]:
    """cluster.yaml's worker node types with their custom resources, GPUs turned into CPUs."""
    source = yaml.safe_load(cluster_yaml.read_text())
    # The fake provider knows the head started by `ray start --head` under this name only; under
    # another, the autoscaler keeps launching and removing extra "head" nodes.
    types: dict[str, Any] = {HEAD: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}}
    for name, spec in source["available_node_types"].items():
        if name == source["head_node_type"]:
            continue
        custom = {k: min(v, max_per_node) for k, v in spec["resources"].items() if k not in ("CPU", "GPU")}
        slots = max(custom.values(), default=1)
        types[name] = {
            "resources": {"CPU": slots, **custom},
            "node_config": {},
            "min_workers": spec.get("min_workers", 0),
            "max_workers": spec["max_workers"],
        }
    empty: dict[str, Any] = {k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")}
    empty |= {k: [] for k in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")}
    return {
        "cluster_name": source["cluster_name"] + "-fake",
        "max_workers": source["max_workers"],
        "upscaling_speed": source.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": 0.25,  # scale down in ~15 s, not cluster.yaml's minutes
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Without it the fake nodes look for a GCS on port 6379.
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": HEAD,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        **empty,
    }


class FakeCluster:
    def __init__(self, root: Path, cluster_yaml: Path, head_cpus: int = 4, max_per_node: int = 2):
        self.root = root
        self.cluster_yaml = cluster_yaml
        self.head_cpus, self.max_per_node = head_cpus, max_per_node
        self.marker = uuid.uuid4().hex
        self.port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        bin_dir = Path(sys.executable).parent  # the `ray` of this environment
        # The marker goes into every command's environment: some node processes inherit the
        # environment of the `ray` command that led to them, not the head's.
        self.env = os.environ | {"RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        self.env[MARKER] = self.marker
        self.env.pop("RAY_ADDRESS", None)
        self.head: subprocess.Popen | None = None

    def __enter__(self) -> FakeCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        import ray

        self.root.mkdir(parents=True, exist_ok=True)
        self.address = f"{ray.util.get_node_ip_address()}:{self.port}"
        config = autoscaler_config(self.cluster_yaml, self.address, self.head_cpus, self.max_per_node)
        (self.root / "autoscaler.json").write_text(json.dumps(config, indent=2))
        env = self.env | {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        self.head = subprocess.Popen(
            [
                "ray",
                "start",
                "--head",
                "--block",
                f"--port={self.port}",
                f"--autoscaling-config={self.root / 'autoscaler.json'}",
                f"--temp-dir={self.root / 'ray'}",
                f"--num-cpus={self.head_cpus}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}",
            ],  # fmt: skip
            env=env,
            start_new_session=True,
            stdout=(self.root / "head.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while self.ray("job", "list", check=False).returncode != 0:
            if time.monotonic() > deadline or self.head.poll() is not None:
                raise RuntimeError(f"fake cluster head did not come up; see {self.root / 'head.log'}")
            time.sleep(2)

    def ray(self, *args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
        """`ray <args>` against this cluster's job API."""
        cmd = ["ray", *args]
        if args[0] == "job":
            cmd[3:3] = ["--address", self.dashboard]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, **kwargs)

    def nodes(self, dead_too: bool = False) -> list[dict[str, Any]]:
        """Alive nodes (and those scaled down or lost, with `dead_too`): {"node_id", "type",
        "resources"}; the head's type is "head", a worker's is its node type in cluster.yaml."""
        from ray.util.state import list_nodes

        types = json.loads((self.root / "autoscaler.json").read_text())["available_node_types"]
        filters = [] if dead_too else [("state", "=", "ALIVE")]
        listed = list_nodes(address=self.dashboard, filters=filters, detail=True, raise_on_missing_output=False)
        return [
            {
                "node_id": n.node_id,
                # A worker type's name is also its custom resource (cluster.yaml's convention).
                "type": "head" if n.is_head_node else next((r for r in n.resources_total if r in types), "?"),
                "resources": n.resources_total,
            }
            for n in listed
        ]

    def actors(self, class_name: str) -> list[Any]:
        """Alive actors of a class (their `pid` and `node_id`), e.g. "Engine", "RayTrainWorker"."""
        from ray.util.state import list_actors

        filters = [("class_name", "=", class_name), ("state", "=", "ALIVE")]
        return list_actors(address=self.dashboard, filters=filters, detail=True, raise_on_missing_output=False)

    def node_pids(self) -> dict[str, int]:
        """node id -> the PID of that fake node's raylet (kill it to lose the node)."""
        pids = {}
        for pid in self.pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"raylet"):
                for arg in cmdline:
                    if arg.startswith(b"--node_id="):
                        pids[arg.split(b"=", 1)[1].decode()] = pid
        return pids

    def pids(self) -> list[int]:
        """Every process this cluster started: the marker in its environment, or this cluster's
        GCS address on its command line, and every descendant of those (the agents that nodes
        start re-exec under new names, and some miss the marker)."""
        needle = f"{MARKER}={self.marker}".encode()
        gcs = f":{self.port}".encode()
        ours, children = set(), {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
                cmdline = (proc / "cmdline").read_bytes()
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
            if needle in env or (b"ray" in cmdline and gcs in cmdline):
                ours.add(int(proc.name))
        todo = list(ours)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in ours:
                    ours.add(child)
                    todo.append(child)
        return sorted(ours)

    def stop(self) -> None:
        # Several rounds: a node the autoscaler was launching meanwhile starts its agents late.
        for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.5)
        if self.head is not None:
            self.head.wait(timeout=30)
        shutil.rmtree(self.root / "ray", ignore_errors=True)
