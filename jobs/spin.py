"""Run every SPIN iteration as one Ray job.

    python jobs/spin.py                                   # the embedded toy world, local Ray, CPU
    python jobs/spin.py --config my.yaml train.lr=1e-7   # your model and data (README)
    ray job submit --working-dir . -- python jobs/spin.py --config my.yaml

Bad config, model or data exit with status 2 and a message before Ray starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: the toy world)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-6")
    args = parser.parse_args(argv)

    from spin_ray.config import ConfigError, load_config
    from spin_ray.coordinator import prepare
    from spin_ray.data import DataError

    try:
        cfg = load_config(args.config, args.overrides)
        cfg.run.output_dir = str(Path(cfg.run.output_dir).resolve())
        prepared = prepare(cfg)
    except (ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"[spin-ray] {len(prepared.train)} training prompts, {len(prepared.eval)} held-out; model {prepared.model_path}"
    )

    import ray

    from spin_ray.coordinator import run_job

    # Ray Data's bars are unreadable when forwarded from actors: the coordinator prints progress.
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    if os.environ.get("RAY_ADDRESS") or cfg.run.ray_address:
        ray.init(address=cfg.run.ray_address, runtime_env={"env_vars": env})
    else:
        # Logical CPUs, not cores: engines and train workers mostly wait on each other, and too few
        # slots leave an actor pending forever without a word.
        g, t = cfg.generation, cfg.train
        demand = g.num_engines * g.num_cpus + t.num_workers * t.num_cpus + 2
        ray.init(num_cpus=max(os.cpu_count() or 1, int(demand + 0.999)), runtime_env={"env_vars": env})
    summary = run_job(cfg, prepared)
    print_table(summary["history"])
    print(f"\noutputs: {summary['output_dir']} (config.yaml, iter_<t>/pairs, iter_<t>/model, metrics.jsonl)")
    return 0


def print_table(history: list[dict]) -> None:
    """One row per iteration; the first row is the start model (p0, or the resumed model)."""
    columns = {
        "loss": "train/loss",
        "reward_acc": "train/rewards/accuracies",
        "margin": "train/rewards/margins",
        "eval_logp": "eval/logps/real",
        "eval_acc": "eval/accuracy",
        "seconds": "time/iteration_s",
    }
    print("\n" + f"{'iter':>6}" + "".join(f"{name:>12}" for name in columns))
    for row in history:
        label = "start" if row is history[0] else str(row["iteration"] + 1)
        cells = (f"{row[key]:>12.4f}" if key in row else f"{'-':>12}" for key in columns.values())
        print(f"{label:>6}" + "".join(cells))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
