"""Chaos run: the toy job on a one-machine autoscaling cluster, with random faults.

    .venv/bin/python scripts/chaos.py --faults 10 --seed 0

Starts a fake autoscaling cluster shaped like cluster.yaml (tests/testbed.py), runs the toy job
once without faults, then again while injecting N faults at random moments once iteration 1 has
begun: an engine process killed (SIGKILL) or frozen (SIGSTOP), a train worker killed, or a whole
generation/training node removed (its raylet killed). Prints what was injected, whether the job
survived, pairs lost and duplicated against the fault-free run, recovery seconds per fault (from
the run's events.jsonl) and the final held-out metrics of both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fake cluster is the tests' test bed

from testbed import FakeCluster  # noqa: E402

SETTINGS = [
    "generation.resource=gen_gpu",
    "train.resource=train_gpu",
    "generation.num_engines=2",
    "generation.health_timeout_s=10",
    "generation.max_restarts=100",
    "train.max_restarts=100",
    "sync.method=broadcast",
    "sync.timeout_s=20",
    "run.wandb_mode=disabled",
]


def inject(cluster: FakeCluster, kind: str, rng: random.Random) -> str | None:
    """One fault of `kind` on a random target; returns what was hit, or None if nothing was there."""
    if kind in ("engine_kill", "engine_freeze", "worker_kill"):
        targets = cluster.actors("Engine" if kind.startswith("engine") else "RayTrainWorker")
        if not targets:
            return None
        pid = rng.choice(targets).pid
        os.kill(pid, signal.SIGSTOP if kind == "engine_freeze" else signal.SIGKILL)
        return f"pid {pid}"
    node_type = "gen_gpu" if kind == "gen_node_loss" else "train_gpu"
    raylets = cluster.node_pids()
    nodes = [n["node_id"] for n in cluster.nodes() if n["type"] == node_type and n["node_id"] in raylets]
    if not nodes:
        return None
    node = rng.choice(nodes)
    os.kill(raylets[node], signal.SIGKILL)
    return f"node {node[:12]}"


def submit(cluster: FakeCluster, out: Path, iterations: int, wait: bool) -> None:
    args = ["job", "submit"] + ([] if wait else ["--no-wait"])  # no --working-dir: see tests/testbed.py
    args += ["--", "python", str(ROOT / "jobs" / "spin.py"), f"run.output_dir={out}", f"spin.iterations={iterations}"]
    args += SETTINGS
    cluster.ray(*args, check=wait, timeout=3600)


def pairs(out: Path, t: int) -> list[str]:
    return pq.read_table(out / f"iter_{t}" / "pairs", columns=["uid"])["uid"].to_pylist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gap", type=float, nargs=2, default=(4.0, 12.0), help="seconds between faults (min max)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    kinds = ["engine_kill", "engine_freeze", "worker_kill", "gen_node_loss", "train_node_loss"]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    root = Path(tempfile.mkdtemp(prefix="spinchaos-", dir="/tmp"))
    with FakeCluster(root / "cluster", ROOT / "cluster.yaml") as cluster:
        clean, chaos = root / "clean", root / "chaos"
        tick = time.monotonic()
        submit(cluster, clean, args.iterations, wait=True)
        print(f"fault-free run: {time.monotonic() - tick:.0f} s", flush=True)

        submit(cluster, chaos, args.iterations, wait=False)
        while not (chaos / "metrics.jsonl").exists():
            time.sleep(0.5)
        injected = []
        tick = time.monotonic()
        while len(injected) < args.faults and not (chaos / "summary.json").exists():
            time.sleep(rng.uniform(*args.gap))
            if "FAILED" in cluster.ray("job", "list", check=False).stdout:
                break
            kind = rng.choice(kinds)
            target = inject(cluster, kind, rng)
            if target:
                injected.append({"kind": kind, "target": target, "at_s": round(time.monotonic() - tick, 1)})
                print(f"[chaos] {injected[-1]}", flush=True)
        while not (chaos / "summary.json").exists():
            status = cluster.ray("job", "list", check=False).stdout
            if "FAILED" in status:
                print("the chaos run FAILED:\n" + status[-3000:])
                return 1
            time.sleep(2)

    events = [json.loads(line) for line in (chaos / "events.jsonl").read_text().splitlines()]
    lost = dup = 0
    for t in range(1, args.iterations + 1):
        want, got = set(pairs(clean, t)), pairs(chaos, t)
        lost += len(want - set(got))
        dup += len(got) - len(set(got))
    final = {
        name: json.loads((d / "summary.json").read_text())["history"][-1]
        for name, d in [("clean", clean), ("chaos", chaos)]
    }
    print(f"\nfaults injected: {len(injected)}; job survived: yes; pairs lost: {lost}; pairs duplicated: {dup}")
    for kind in kinds:
        n = sum(f["kind"] == kind for f in injected)
        print(f"  {kind:<16} {n}")
    print("recoveries (events.jsonl):")
    for e in events:
        print(f"  {e['kind']:<18} {e.get('cause', e.get('during', '')):<60.60} {e.get('recovery_s', 0):6.1f} s")
    for key in ("eval/accuracy", "eval/logps/real"):
        print(f"final {key}: fault-free {final['clean'][key]:.4f}, chaos {final['chaos'][key]:.4f}")
    return 0 if lost == dup == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
