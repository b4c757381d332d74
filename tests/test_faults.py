"""Faults on an autoscaling cluster: Ray's own autoscaler (fake multi-node provider) with the node
types of cluster.yaml, the toy job submitted with `ray job submit`, and processes killed by PID.

One scenario, many assertions (each job here costs minutes):
  job A  gen_gpu and train_gpu nodes come up from zero; both engines are killed mid-generation
         (their batches run again on replacements); a train worker is killed mid-training (the
         group restarts and trains the iteration again); the driver is killed once iteration 2
         is done.
  job B  the same command again: resumes at iteration 3 and finishes.
Then the nodes scale down. Pairs and final weights must equal the fault-free reference run.
"""

import json
import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import ROOT
from safetensors.torch import load_file
from testbed import FakeCluster

SETTINGS = [  # the reference run's settings (helpers.toy_config), as command-line overrides
    "generation.temperature=0",
    "model.dtype=float32",
    "train.lr=1e-3",
    "train.batch_size=8",
    "train.log_every=2",
    "spin.iterations=3",
]
PLACEMENT = [  # operational: where things run and how faults are handled
    "generation.resource=gen_gpu",
    "train.resource=train_gpu",
    "generation.num_engines=2",
    "generation.batch_size=8",
    "generation.health_timeout_s=10",
    "sync.method=broadcast",
    "sync.timeout_s=20",
    "train.stall_timeout_s=300",
    "run.wandb_mode=disabled",
]


def wait_for(what: str, check, timeout: float = 300, every: float = 0.2, out: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (where_the_job_is(out) if out else ""))


def where_the_job_is(out: Path) -> str:
    """What a timed-out wait shows: the job's events and the ends of its logs."""
    lines = [f"\n--- {p.name}: {p.read_text()[-1500:]}" for p in sorted(out.glob("events.jsonl"))]
    for pattern in ("driver.log", "coordinator-*.log", "engine-pool-*.log", "train-rank*.log"):
        for log in sorted((out / "logs").glob(pattern)):
            lines.append(f"\n--- {log.name}: ..." + "\n".join(log.read_text().splitlines()[-15:]))
    return "".join(lines)


def driver_pid(cluster: FakeCluster) -> int | None:
    for pid in cluster.pids():
        try:
            if b"jobs/spin.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


@pytest.fixture(scope="module")
def scenario(toy_run):
    ref_out = toy_run[0]
    root = Path("/tmp") / f"spinfc-{os.getpid()}"  # short: Ray's socket paths have a length limit
    out = root / "run"
    command = ["--", "python", str(ROOT / "jobs" / "spin.py"), f"data.train_path={ref_out.parent / 'train.jsonl'}"]
    command += [f"run.output_dir={out}", *SETTINGS, *PLACEMENT]
    seen: dict = {"node_types": set(), "engine_nodes": set(), "worker_nodes": set(), "nodes": {}}
    with FakeCluster(root, ROOT / "cluster.yaml") as cluster:
        seen["nodes_before"] = [n["type"] for n in wait_for("the head", cluster.nodes, timeout=60, every=1)]

        def observe():
            for n in cluster.nodes(dead_too=True):
                seen["nodes"][n["node_id"]] = n["type"]
            seen["engine_nodes"] |= {a.node_id for a in cluster.actors("Engine")}
            seen["worker_nodes"] |= {a.node_id for a in cluster.actors("RayTrainWorker")}

        # No --working-dir on a fake cluster (see tests/testbed.py): the code is the editable install.
        cluster.ray("job", "submit", "--no-wait", *command)
        # Job A. Fault 1: freeze both engines as soon as the first generation starts (the start
        # model's evaluation waits for its first pairs), then kill them mid-batch.
        wait_for(
            "engines and workers",
            lambda: len(cluster.actors("Engine")) == len(cluster.actors("RayTrainWorker")) == 2,
            timeout=600,
            every=1,
            out=out,
        )
        engines = [a.pid for a in cluster.actors("Engine")]
        worker = cluster.actors("RayTrainWorker")[0].pid
        generated = out / "iter_1" / "pairs.tmp"
        wait_for("iteration 1's generation", generated.exists, timeout=600, every=0.005, out=out)
        for pid in engines:
            os.kill(pid, signal.SIGSTOP)
        observe()
        time.sleep(0.5)
        for pid in engines:
            os.kill(pid, signal.SIGKILL)
        # Fault 2: freeze a train worker once it has the streamed training task (it waits for
        # pairs from the replacement engines), and kill it once every pair is made: the new group
        # gets the stream again from its first pair, read back from disk.
        wait_for("the streamed training", lambda: runs_train(out, worker), every=0.01, out=out)
        os.kill(worker, signal.SIGSTOP)
        wait_for("iteration 1's pairs", lambda: len(list(generated.glob("part-*.parquet"))) == 6, timeout=600, out=out)
        time.sleep(1)
        os.kill(worker, signal.SIGKILL)
        seen |= {"killed_engines": engines, "killed_worker": worker}
        observe()
        # Fault 3: the driver dies once iteration 2 is done. Freezing the coordinator first holds
        # the job right there (it would otherwise finish iteration 3 before the kill lands).
        wait_for("iteration 2 done", lambda: (out / "iter_2" / "DONE").exists(), timeout=600, every=0.02, out=out)
        coordinator = cluster.actors("Coordinator")[0].pid
        os.kill(coordinator, signal.SIGSTOP)
        os.kill(wait_for("the driver", lambda: driver_pid(cluster)), signal.SIGKILL)
        os.kill(coordinator, signal.SIGKILL)  # the driver's side of the job: gone with it
        seen["events_job_a"] = read_events(out)
        wait_for("job A's processes to go", lambda: not cluster.actors("Engine"), timeout=120)

        # Job B: the same command resumes.
        proc = cluster.ray("job", "submit", *command, check=False, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        seen["job_b_log"] = proc.stdout
        # A node job B used may be gone already (scaled down once idle): dead nodes keep their type.
        seen["nodes"] |= {n["node_id"]: n["type"] for n in cluster.nodes(dead_too=True)}
        summary = json.loads((out / "summary.json").read_text())
        seen["engine_nodes"] |= {e["node"] for e in summary["engines"]}
        seen["worker_nodes"] |= set(summary["trainer_nodes"])
        tick = time.monotonic()
        wait_for("scale-down", lambda: [n["type"] for n in cluster.nodes()] == ["head"], timeout=180, every=2)
        seen["scale_down_s"] = time.monotonic() - tick
    return out, ref_out, summary, seen


def types_of(seen: dict, node_id: str) -> str:
    return seen["nodes"].get(node_id, "?")


def runs_train(out: Path, pid: int) -> bool:
    """Whether the train worker `pid` has been given its training task (its log says so)."""
    return any("runs train" in log.read_text() for log in (out / "logs").glob(f"train-rank*-{pid}.log"))


def read_events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_autoscaler_launches_both_node_types_from_zero_and_scales_down(scenario):
    _, _, summary, seen = scenario
    assert seen["nodes_before"] == ["head"]
    types = seen["nodes"]
    assert {"gen_gpu", "train_gpu"} <= set(types.values())
    assert {types[n] for n in seen["engine_nodes"]} == {"gen_gpu"}  # engines only on generation nodes
    assert {types[n] for n in seen["worker_nodes"]} == {"train_gpu"}  # workers only on training nodes
    assert seen["scale_down_s"] < 180


def test_every_fault_survived_with_identical_pairs_and_weights(scenario):
    out, ref_out, summary, seen = scenario
    events = seen["events_job_a"]
    engine_events = [e for e in events if e["kind"] == "engine_replaced"]
    assert sorted(e["old_pid"] for e in engine_events) == sorted(seen["killed_engines"])
    # A death, seen by the batch's own call or by the health ping first, whichever came sooner.
    assert all("ActorDiedError" in e["cause"] for e in engine_events)
    assert all(types_of(seen, e["new_node"]) == "gen_gpu" for e in engine_events)
    restarts = [e for e in events if e["kind"] == "trainer_restarted"]
    assert len(restarts) == 1 and restarts[0]["during"] == "train" and seen["killed_worker"] in restarts[0]["pids"]
    assert "[resume] iterations 1..2 are done" in seen["job_b_log"]
    for t in (1, 2, 3):  # exactly one pair per record, none lost or duplicated, equal to the reference
        got = pq.read_table(out / f"iter_{t}" / "pairs").to_pylist()
        want = {r["uid"]: r["generated_ids"] for r in pq.read_table(ref_out / f"iter_{t}" / "pairs").to_pylist()}
        assert len(got) == len(want) == len({r["uid"] for r in got})
        assert {r["uid"]: r["generated_ids"] for r in got} == want
    final, reference = (load_file(d / "iter_3" / "model" / "model.safetensors") for d in (out, ref_out))
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(final[name], tensor), name
    assert [row["iteration"] for row in summary["history"]] == [2, 3]
