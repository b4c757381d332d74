"""deploy/kuberay stays honest without a Kubernetes cluster: the manifests parse, their worker
groups are cluster.yaml's node types with the resources the config names, the dry run places
the README's 7B config on them, and their entrypoints are the commands the README documents."""

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from helpers import LLAMA_7B, shaped_model

from spin_ray.config import load_config
from spin_ray.driver import placement, plan
from spin_ray.driver.prepare import prepare
from spin_ray.serve import app

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "deploy" / "kuberay"
README = (ROOT / "README.md").read_text()


def manifest(name: str) -> dict:
    (doc,) = yaml.safe_load_all((KUBERAY / name).read_text())
    return doc


def ray_resources(group: dict) -> dict[str, float]:
    """What Ray sees on a pod of the group, as KubeRay starts it: num-cpus, the container's GPU
    limit, and the custom resources (a JSON object inside a quoted string)."""
    (container,) = group["template"]["spec"]["containers"]
    params = group["rayStartParams"]
    resources = {"CPU": float(params["num-cpus"])}
    if gpus := container["resources"]["limits"].get("nvidia.com/gpu"):
        resources["GPU"] = float(gpus)
    if custom := params.get("resources"):
        resources |= {k: float(v) for k, v in json.loads(json.loads(custom)).items()}
    return resources


def readme_7b_config() -> dict:
    block = README.split("A minimal config for a 7B model on a GPU cluster:", 1)[1]
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", block, re.S).group(1))


def pods(spec: dict) -> list[dict]:
    cluster = spec["rayClusterSpec"]
    return [g["template"]["spec"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]


@pytest.mark.parametrize("name", ["rayjob.yaml", "rayservice.yaml"])
def test_groups_are_cluster_yaml_node_types_with_the_configs_resources(name):
    spec = manifest(name)["spec"]
    launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert set(ray_resources(head)) == {"CPU"}  # no GPUs on the head
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    for group_name, group in groups.items():
        node_type = launcher[group_name.replace("-", "_")]
        assert ray_resources(group) == node_type["resources"], group_name
        assert group["maxReplicas"] == node_type["max_workers"]
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    cfg = readme_7b_config()
    custom = {k for g in groups.values() for k in ray_resources(g)} - {"CPU", "GPU"}
    wanted = {cfg["generation"]["resource"]} | ({cfg["train"]["resource"]} if name == "rayjob.yaml" else set())
    assert wanted == custom
    for pod in pods(spec):
        mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts["shared"] == "/shared"
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == manifest("storage.yaml")["metadata"]["name"]
    assert cfg["run"]["output_dir"].startswith("/shared/")


def test_rayjob_scales_from_zero_ends_itself_and_runs_the_readme_command():
    spec = manifest("rayjob.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert all(g["minReplicas"] == g["replicas"] == 0 for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    for pod in pods(spec):
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounts = [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]]
        assert len(shm) == 1 and "/dev/shm" in mounts
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    config_mount = next(m["mountPath"] for c in head["containers"] for m in c["volumeMounts"] if m["name"] == "config")
    # the README's `ray job submit`, with my.yaml as the ConfigMap docs/kubernetes.md creates from it
    assert shlex.split(spec["entrypoint"]) == ["python", "jobs/spin.py", "--config", f"{config_mount}/spin.yaml"]
    assert "-- python jobs/spin.py --config my.yaml" in README
    assert "--from-file=spin.yaml=my.yaml" in (ROOT / "docs" / "kubernetes.md").read_text()
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": "/app"}
    assert "WORKDIR /app" in (KUBERAY / "Dockerfile").read_text()


def test_dry_run_places_the_readme_7b_config_on_the_rayjob_groups(toy, tmp_path, capsys, monkeypatch):
    spec = manifest("rayjob.yaml")["spec"]["rayClusterSpec"]
    head = ray_resources(spec["headGroupSpec"])
    groups = [(g["groupName"], ray_resources(g), g["maxReplicas"]) for g in spec["workerGroupSpecs"]]
    kinds, max_new = placement.node_types(groups, [head], None)
    # A100 40GB: the smaller GPU of cluster.yaml's two node types
    cluster = placement.Cluster("KubeRay groups", [head], kinds, max_new, 40.0, "the test")
    model = shaped_model(tmp_path / "llama7b", toy, LLAMA_7B)
    written = tmp_path / "my.yaml"
    written.write_text(yaml.safe_dump(readme_7b_config()))
    local = [f"model.path={model}", f"data.train_path={model / 'train.jsonl'}", f"run.output_dir={tmp_path / 'run'}"]
    cfg = load_config(written, local)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(plan, "local_cluster", lambda cfg: cluster)
    assert plan.dry_run(cfg, prepare(cfg, dry_run=True)) == 0
    out = capsys.readouterr().out
    assert (
        "engines      4 x {CPU 0.5, GPU 1, gen_gpu 1} = {CPU 2, GPU 4, gen_gpu 4}: OK, the autoscaler adds gen-gpu x1"
        in out
    )
    workers = "workers      8 x {CPU 1, GPU 1, train_gpu 1} = {CPU 8, GPU 8, train_gpu 8}"
    assert f"{workers}: OK, the autoscaler adds train-gpu x1" in out
    assert "WARN:" not in out and "verdict      OK" in out


def test_rayservice_runs_jobs_serve_py_app():
    serve_config = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    module, _, name = application["import_path"].partition(":")
    assert (module, getattr(sys.modules[module], name)) == ("spin_ray.serve.app", app.build)
    assert set(application["args"]) <= {"path", "iteration", "merged", "overrides"}
    assert application["args"]["path"] == readme_7b_config()["run"]["output_dir"]
