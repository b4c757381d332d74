"""Soak: one toy job of many iterations, with the memory of every long-lived process, the object
store's bytes in use and open file descriptors sampled once per iteration. Prints each series and
its slope (least squares over the iterations after the first two, per iteration); flat is the aim.

    python benchmarks/soak.py                   # 20 iterations, ~10 minutes on 2 cores
    python benchmarks/soak.py --iterations 5    # the smoke test's size
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "jobs"))
ACTORS = ("Coordinator", "EnginePool", "Engine", "Channel", "RayTrainWorker")


def processes() -> dict[str, int]:
    """name -> pid of the driver and of every long-lived actor alive now."""
    from ray.util.state import list_actors

    found = {"driver": os.getpid()}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        name = actor.class_name.split(".")[-1]
        if name in ACTORS and actor.pid:
            found[f"{name}-{actor.pid}" if name in ("Engine", "RayTrainWorker") else name] = actor.pid
    return found


def sample(row: dict) -> None:
    from spin_ray.private import object_store_bytes

    for name, pid in processes().items():
        try:
            p = psutil.Process(pid)
            row[f"rss_mb/{name}"] = p.memory_info().rss / 2**20
            row[f"fds/{name}"] = p.num_fds()
        except psutil.Error:
            continue
    row["object_store_mb"] = object_store_bytes() / 2**20


def watch(out: Path, iterations: int, rows: list[dict], stop: threading.Event) -> None:
    """One sample each time an iteration's DONE marker appears."""
    t = 1
    while t <= iterations and not stop.is_set():
        if (out / f"iter_{t}" / "DONE").exists():
            row = {"iteration": t}
            sample(row)
            rows.append(row)
            t += 1
        time.sleep(0.2)


def slopes(rows: list[dict]) -> dict[str, tuple[float, float, float]]:
    """key -> (first, last, slope per iteration) over the rows after warm-up."""
    steady = rows[2:] if len(rows) > 4 else rows
    result = {}
    for key in sorted({k for r in rows for k in r} - {"iteration"}):
        points = [(r["iteration"], r[key]) for r in steady if key in r]
        if len(points) >= 2:
            x, y = np.array(points).T
            result[key] = (y[0], y[-1], float(np.polyfit(x, y, 1)[0]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    from spin import init_ray

    from spin_ray.config import load_config
    from spin_ray.driver.job import run_job
    from spin_ray.driver.prepare import prepare

    out = Path(tempfile.mkdtemp(prefix="spin-soak-")) / "run"
    overrides = [f"run.output_dir={out}", f"spin.iterations={args.iterations}", "data.max_examples=128"]
    cfg = load_config(ROOT / "configs" / "toy.yaml", overrides + ["run.wandb_mode=disabled"])
    prepared = prepare(cfg)
    init_ray(cfg)
    rows: list[dict] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(out, args.iterations, rows, stop), daemon=True)
    watcher.start()
    tick = time.perf_counter()
    try:
        run_job(cfg, prepared)
    finally:
        stop.set()
        watcher.join(timeout=10)
    print(f"\n{args.iterations} iterations in {time.perf_counter() - tick:.0f} s, {len(rows)} samples")
    print(f"{'series':<40} {'first':>10} {'last':>10} {'slope/iter':>12}")
    for key, (first, last, slope) in slopes(rows).items():
        print(f"{key:<40} {first:>10.1f} {last:>10.1f} {slope:>+12.3f}")


if __name__ == "__main__":
    main()
