"""Run every SPIN iteration as one Ray job.

    python jobs/spin.py                                   # the embedded toy world, local Ray, CPU
    python jobs/spin.py model.path=smollm2                # a real chat model on CPU (configs/smollm2.yaml)
    python jobs/spin.py --config my.yaml train.lr=1e-7   # your model and data (README)
    python jobs/spin.py --dry-run --config my.yaml       # check everything, print the plan, exit
    ray job submit --working-dir . -- python jobs/spin.py --config my.yaml

Bad config, model or data exit with status 2 and a message before Ray starts. The console shows
progress; what the libraries print goes to run.output_dir/logs/ (`--verbose` shows it all here).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spin_ray.config import Config

os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # before pyarrow loads: see streaming_allocators
LAUNCHED = time.time()  # before the heavy imports (in main): the start-up breakdown counts them

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BUILTIN = ("toy", "smollm2")  # model.path words with a config of their own in configs/


def default_config(overrides: list[str]) -> Path | None:
    """configs/<model.path>.yaml for a built-in model (the toy when none is named); None, the
    defaults of spin_ray/config.py, for any other: the toy's token limits and learning rate are
    not a real model's."""
    named = [o.partition("=")[2].strip() for o in overrides if o.startswith("model.path=")]
    model = named[-1] if named else "toy"
    return CONFIGS / f"{model}.yaml" if model in BUILTIN else None


def init_ray(cfg: Config) -> None:
    """Joins the configured cluster, or starts a local Ray sized for the job."""
    import ray

    from spin_ray.cluster import local_cpus, ray_address, workers_not_niced
    from spin_ray.logs import LOG_DIR_ENV, log_driver_to
    from spin_ray.rundir import RunDir

    out = Path(cfg.run.output_dir)
    # Ray Data's bars are unreadable when forwarded from actors: the console draws progress.
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"  # Ray Train would print each worker line twice
    runtime_env: dict = {"env_vars": env}
    if not cfg.run.verbose:
        log_driver_to(RunDir(out).logs)
        env[LOG_DIR_ENV] = str(RunDir(out).logs)
        runtime_env["worker_process_setup_hook"] = "spin_ray.logs.capture_output"
    init = dict(runtime_env=runtime_env, log_to_driver=cfg.run.verbose, configure_logging=cfg.run.verbose)
    if ray_address(cfg):
        ray.init(address=cfg.run.ray_address, **init)
        return
    num_cpus = local_cpus(cfg)
    # Ray warns when more worker processes start than the machine has cores; this job starts
    # one per actor by design, so the warning would be noise on a small machine.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(num_cpus))
    workers_not_niced()
    # Every process of a local Ray inherits this one's environment: the keys stay out of it
    # (the coordinator alone gets the W&B key, spin_ray.driver.job; the serving key never leaves).
    keys = {k: os.environ.pop(k) for k in ("WANDB_API_KEY", cfg.serve.api_key_env) if k in os.environ}
    try:
        ray.init(num_cpus=num_cpus, **init)
    finally:
        os.environ.update(keys)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", help="YAML config (default: configs/toy.yaml, or configs/smollm2.yaml with model.path=smollm2)"
    )
    parser.add_argument("--dry-run", action="store_true", help="check config, model and data, print the plan, exit")
    parser.add_argument("--verbose", action="store_true", help="show every library's output (same as run.verbose=true)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-6")
    args = parser.parse_args(argv)

    from spin_ray.config import ConfigError, load_config
    from spin_ray.data import DataError
    from spin_ray.driver.prepare import prepare
    from spin_ray.rundir import RunDirBusy

    try:
        config = args.config or default_config(args.overrides)
        cfg = load_config(config, args.overrides + ["run.verbose=true"] * args.verbose)
        cfg.run.output_dir = str(Path(cfg.run.output_dir).resolve())
        prepared = prepare(cfg, dry_run=args.dry_run)
    except (ConfigError, DataError, ValueError, RunDirBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    marks = {"launch": LAUNCHED, "checked": time.time()}
    if args.dry_run:
        from spin_ray.driver.plan import dry_run

        return dry_run(cfg, prepared)
    init_ray(cfg)
    marks["ray_up"] = time.time()

    from spin_ray.driver.console import Console, header
    from spin_ray.driver.job import run_job
    from spin_ray.loop.progress import table

    out = Path(cfg.run.output_dir)
    print(header(cfg, prepared), flush=True)
    try:
        summary = run_job(cfg, prepared, Console(out), marks)
    except Exception as e:  # the whole story is in the logs; the console gets the cause
        logging.getLogger("spin_ray").exception("the job failed")
        cause = getattr(e, "cause", None) or e
        print(f"\nerror: {type(cause).__name__}: {cause}\nlogs: {out / 'logs'}", file=sys.stderr)
        return 1
    print("\n" + table(summary["history"]))
    print(f"\nreport:  {out / 'report.html'}  (python -m spin_ray.report {out} rebuilds it)")
    print(f"outputs: {out} (config.yaml, iter_<t>/pairs, iter_<t>/model = p_t, metrics.jsonl, logs/)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
