"""SPIN against the same-compute SFT baseline, over seeds, in one Ray session.

    python scripts/spin_vs_sft.py --seeds 0 1 2 3 4 --out runs/study [key.sub=value ...]
    python scripts/spin_vs_sft.py --config configs/smollm2.yaml --seeds 0 1 --out runs/smollm2-study

Runs the config (the toy's by default) once per (seed, arm) with the given overrides (on a built-in
model each seed is its own world: the toy's data and p_0, SmolLM2's data), then prints
`jobs/compare.py`'s table for all of them.

`--converged` first trains p_0 with SFT on the same prompts until it has stopped improving
(CONVERGE: 6 iterations at 5x the lr) and starts both arms from that model: the regime in which
the SPIN paper says further SFT no longer helps.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONVERGE = ["spin.objective=sft", "spin.iterations=6", "train.lr=5e-5"]
sys.path.insert(0, str(ROOT / "jobs"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "toy.yaml")
    parser.add_argument("--converged", action="store_true", help="start both arms from an SFT-converged p_0")
    parser.add_argument("overrides", nargs="*", help="applied to both arms")
    args = parser.parse_args(argv)

    import compare
    import ray

    from spin_ray.cluster import workers_not_niced
    from spin_ray.config import load_config
    from spin_ray.driver.job import run_job
    from spin_ray.driver.prepare import builtin_world, prepare

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    workers_not_niced()  # as jobs/spin.py starts its local Ray
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    runs = []

    def run(out: Path, overrides: list[str]) -> None:
        cfg = load_config(args.config, [*overrides, f"run.output_dir={out}", "run.wandb_mode=disabled"])
        print(f"== {out}", flush=True)
        run_job(cfg, prepare(cfg))

    for seed in args.seeds:
        start = [f"run.seed={seed}"]
        if args.converged:
            p0 = Path(args.out) / f"p0-s{seed}"
            run(p0, start + args.overrides + CONVERGE)  # the same task and settings, SFT-converged
            world = builtin_world(load_config(args.config, [*start, *args.overrides]))
            start += [f"model.path={p0 / 'iter_6' / 'model'}", f"data.train_path={world.train_path}"]
            start += [f"data.eval_path={world.eval_path}"]
        for arm in ("spin", "sft"):
            out = Path(args.out) / f"{arm}-s{seed}"
            run(out, start + [f"spin.objective={arm}", *args.overrides])
            runs.append(str(out))
    ray.shutdown()
    # On a built-in model each seed is its own world (data, and the toy's p_0): compared within seeds.
    return compare.main([*runs, "--out", args.out, "--per-seed"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
