"""Scores a SPIN run's models (p_0 and every finished iter_<t>/model), or one HF model dir, on
lm-evaluation-harness tasks, through vLLM engines of its own started by the job's engine code.

    python jobs/evaluate.py RUN_DIR --tasks arc_easy,hellaswag --limit 200
    python jobs/evaluate.py MODEL_DIR --tasks my_task --include-path my_tasks/ --chat-template

One engine start for all the models: each next checkpoint is loaded into the running engines.
Prints a table and appends the scores as JSON lines to --out (default RUN_DIR/lm_eval.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a run dir (run.output_dir) or a Hugging Face model dir")
    parser.add_argument("--tasks", required=True, help="lm-eval tasks or groups, comma-separated")
    parser.add_argument("--include-path", help="a dir of task YAMLs of your own")
    parser.add_argument("--limit", type=int, help="score only the first N documents of each task")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts in the model's chat template")
    parser.add_argument(
        "--max-model-len", type=int, help="engine context (default: the model's max_position_embeddings)"
    )
    parser.add_argument("--out", help="JSON lines file to append to (default RUN_DIR/lm_eval.jsonl, or none)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. generation.num_engines=2")
    args = parser.parse_intermixed_args(argv)

    from transformers import AutoConfig, AutoTokenizer

    from spin_ray.config import ConfigError, load_config
    from spin_ray.driver.prepare import builtin_world
    from spin_ray.lora import split
    from spin_ray.metrics import check_tasks
    from spin_ray.serve.app import checkpoints

    path = Path(args.path)
    stored = path / "config.yaml"
    lm = {"tasks": args.tasks.split(","), "include_path": args.include_path, "limit": args.limit}
    flags = [f"eval.lm_eval.{k}={json.dumps(v)}" for k, v in lm.items()]
    flags += [
        f"eval.lm_eval.num_fewshot={json.dumps(args.num_fewshot)}",
        f"eval.lm_eval.chat_template={args.chat_template}",
    ]
    try:
        cfg = load_config(stored if stored.exists() else None, [*args.overrides, *flags])
        models = checkpoints(path, "all")
        if stored.exists():  # a run dir: its start model first
            world = builtin_world(cfg)
            start = world.model_dir if world else Path(cfg.model.path)
            models = {"p_0": start} | {name.replace("spin-iter-", "p_"): d for name, d in models.items()}
        check_tasks(cfg.eval.lm_eval.tasks, cfg.eval.lm_eval.include_path)
        first = str(next(iter(models.values())))
        length = args.max_model_len or AutoConfig.from_pretrained(split(first)[0]).max_position_embeddings
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg.run.output_dir = tempfile.mkdtemp(prefix="spin-evaluate-")  # the engines' event records, not the run's

    from lm_eval.tasks import TaskManager

    from spin_ray.cluster import join_or_start, local_cpus
    from spin_ray.engines.client import Engines
    from spin_ray.logs import console_to_log, error_line
    from spin_ray.loop.harness import EngineLM, lm_eval_metrics

    say, log = console_to_log(path, "evaluate")
    say(f"scoring {', '.join(models)} on {', '.join(cfg.eval.lm_eval.tasks)}; the libraries' output: {log}")
    out = Path(args.out) if args.out else (path / "lm_eval.jsonl" if stored.exists() else None)
    engines = None
    try:
        join_or_start(cfg, local_cpus(cfg))
        engines = Engines(cfg, first, length)
        engines.wait_ready()
        tokenizer = AutoTokenizer.from_pretrained(split(first)[0])
        model = EngineLM(engines, tokenizer, cfg.generation, length, cfg.eval.lm_eval.batch_size)
        tasks = TaskManager(include_path=cfg.eval.lm_eval.include_path)
        for name, model_dir in models.items():
            if str(model_dir) != first:
                engines.set_weights(str(model_dir))
                engines.reload()
            scores = lm_eval_metrics(model, cfg.eval.lm_eval, tasks, cfg.run.seed)
            say(f"{name:<10}" + "  ".join(f"{k.removeprefix('eval/lm_eval/')} {v:.4f}" for k, v in scores.items()))
            if out is not None:
                with open(out, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"model": name, "path": str(model_dir), "time": time.time(), **scores}) + "\n")
    except KeyboardInterrupt:
        say("interrupted: the scores so far are on the lines above")
        return 130
    except Exception as e:  # noqa: BLE001 - said on the console, its traceback in the log
        say(f"{error_line(e)}\n  (whole: {log})")
        return 1
    finally:
        if engines is not None:
            engines.shutdown()
    if out is not None:
        say(f"scores appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
