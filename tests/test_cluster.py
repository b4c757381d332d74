"""cluster.yaml passes Ray's own launcher checks, and it agrees with spin-ray's config.

Offline: prepare_config + validate_config only read Ray's bundled aws/defaults.yaml and
ray-schema.json. Sockets are blocked below so a change that reaches AWS fails here rather than
hanging. No Ray cluster is started.
"""

import re
import socket
from pathlib import Path

import pytest
import yaml

from spin_ray.cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
GPU_TYPES = {"gen_gpu": "generation", "train_gpu": "train"}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster config checks must stay offline (tried to connect: {args})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def raw():
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture
def prepared(raw, no_network):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(raw)  # merges Ray's aws/defaults.yaml, fills per-type min/max workers
    validate_config(config)  # ray-schema.json + Ray's cross-field checks
    return config


def test_ray_accepts_cluster_yaml(prepared):
    assert prepared["cluster_name"] == "spin-ray"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert 0 < prepared["max_workers"] <= 16
    assert prepared["idle_timeout_minutes"] > 0


def test_head_keeps_its_cpus(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("CPU") != 0  # the driver and the coordinator run on the head
    assert "GPU" not in head["resources"]
    assert head["max_workers"] == 0


@pytest.mark.parametrize("node_type", sorted(GPU_TYPES))
def test_gpu_node_types(prepared, raw, node_type):
    spec = prepared["available_node_types"][node_type]
    assert raw["available_node_types"][node_type]["min_workers"] == 0  # set explicitly: scale from zero
    assert spec["min_workers"] == 0
    assert spec["max_workers"] > 0
    resources = spec["resources"]
    assert resources[node_type] >= 1
    assert resources["GPU"] == resources[node_type]
    assert spec["node_config"]["InstanceType"]
    assert spec["node_config"]["ImageId"].startswith("ami-")
    others = set(GPU_TYPES) - {node_type}
    assert not others & set(resources), f"{node_type} must not advertise {others}"


def test_every_node_installs_the_gpu_extra(prepared):
    # prepare_config prepends setup_commands to the head's and the workers' own lists.
    for key in ("head_setup_commands", "worker_setup_commands"):
        installs = [c for c in prepared[key] if "pip install" in c and "spin-ray[gpu]" in c]
        assert installs, f"{key} does not install spin-ray[gpu]: {prepared[key]}"
    assert any("boto3" in c for c in prepared["head_setup_commands"])  # the AWS autoscaler needs it


def test_file_mounts_exist_locally(prepared):
    # `ray up` asserts each local path exists; they are relative to the repo root.
    for remote, local in prepared["file_mounts"].items():
        assert remote.startswith("~/spin-ray")
        assert (ROOT / local).exists(), local
    assert "~/spin-ray/pyproject.toml" in prepared["file_mounts"]


def test_spin_config_matches_cluster(raw):
    from spin_ray.config import Config, load_config

    cfg = load_config(None, ["generation.resource=gen_gpu", "train.resource=train_gpu"])
    for node_type, section in GPU_TYPES.items():
        assert getattr(cfg, section).resource == node_type
        assert node_type in raw["available_node_types"][node_type]["resources"]
    # The GPU settings the header comment suggests validate together.
    load_config(
        None,
        [
            "generation.resource=gen_gpu",
            "generation.num_gpus=1",
            "train.resource=train_gpu",
            "train.use_gpu=true",
            "train.num_workers=8",
        ],
    )

    # Every `section.key` that the comments mention is a real config field.
    text = CLUSTER_YAML.read_text()
    comments = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    sections = "|".join(Config.model_fields)
    keys = set(re.findall(rf"(?<![\w/.-])({sections})\.([a-z_]+)\b", comments))
    assert {("generation", "resource"), ("train", "resource")} <= keys
    for section, name in sorted(keys):
        fields = Config.model_fields[section].annotation.model_fields
        assert name in fields, f"cluster.yaml mentions {section}.{name}, which spin_ray.config does not have"


def test_free_ports_are_outside_rays_worker_ports_and_the_ephemeral_range():
    """A port from the ephemeral range can be taken by any outbound connection before its server
    binds it (the toy job's live endpoint once failed to start so)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert all(20000 <= p < low for p in ports)
    assert len(set(ports)) > 150  # random: two callers in a row rarely get the same one
