"""The SPIN loop as one Ray job: long-lived engines and trainer, one coordinator actor.

`prepare()` does every cheap check (config, model, data) before anything expensive starts;
`Coordinator.run()` is the paper's algorithm, iteration by iteration.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from spin_ray.config import Config
from spin_ray.data import Example, load_sft
from spin_ray.generation import launch_engines, sample_seed, through_engines, wait_ready
from spin_ray.sync import connect, plan_buckets, sync_weights
from spin_ray.tracking import Tracker
from spin_ray.training import Trainer

# vLLM's CPU attention kernels reject other head sizes, and only after ~40 s of start-up.
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 256)


@dataclass
class Prepared:
    """What a run needs, checked in the driver before Ray, engines or trainers start."""

    model_path: str
    train: list[Example]
    eval: list[Example]
    toy: bool
    max_model_len: int


def prepare(cfg: Config) -> Prepared:
    from transformers import AutoConfig, AutoTokenizer

    toy = cfg.model.path == "toy"
    model_path, train_path, eval_path = cfg.model.path, cfg.data.train_path, cfg.data.eval_path
    if toy:
        from spin_ray.toy import build_toy_world

        cache = Path(os.environ.get("SPIN_RAY_CACHE", Path.home() / ".cache" / "spin-ray"))
        world = build_toy_world(cache / f"toy-seed{cfg.run.seed}", seed=cfg.run.seed)
        model_path = str(world.model_dir)
        train_path = train_path or str(world.train_path)
        eval_path = eval_path or str(world.eval_path)
    try:
        model_config = AutoConfig.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path={model_path!r}: cannot load a Hugging Face model config/tokenizer ({e})") from e
    if tokenizer.chat_template is None:
        raise ValueError(f"model.path={model_path!r}: tokenizer has no chat_template; SPIN data is chat `messages`")
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    if cfg.generation.num_gpus == 0 and head_dim not in CPU_HEAD_DIMS:
        raise ValueError(
            f"model.path={model_path!r}: head_dim {head_dim} is not supported by vLLM on CPU {CPU_HEAD_DIMS}"
        )
    d = cfg.data
    load = dict(
        max_prompt_tokens=d.max_prompt_tokens, max_response_tokens=d.max_response_tokens, long_prompts=d.long_prompts
    )
    train = load_sft(train_path, tokenizer, max_examples=d.max_examples, **load)
    evaluation = load_sft(eval_path, tokenizer, **load) if eval_path else []
    longest = max(d.max_response_tokens, cfg.generation.max_tokens)
    max_model_len = cfg.generation.max_model_len or d.max_prompt_tokens + longest + 1
    if max_model_len > getattr(model_config, "max_position_embeddings", max_model_len):
        raise ValueError(
            f"data.max_prompt_tokens + max(data.max_response_tokens, generation.max_tokens) = {max_model_len - 1} "
            f"exceeds the model's max_position_embeddings ({model_config.max_position_embeddings}): lower them"
        )
    return Prepared(model_path, train, evaluation, toy, max_model_len)


def _rows(examples: list[Example], seed: int, iteration: int) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "uid": e.uid,
                "prompt": e.prompt,
                "real": e.real,
                "prompt_ids": e.prompt_ids,
                "real_ids": e.real_ids,
                "seed": sample_seed(seed, iteration, e.uid),
            }
            for e in examples
        ]
    )


class Coordinator:
    def __init__(self, cfg: Config, prepared: Prepared):
        self.cfg = cfg
        self.p = prepared
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(cfg.to_yaml())

    def run(self) -> dict[str, Any]:
        """SPIN (Chen et al. 2024, Algorithm 1), one iteration per loop turn."""
        cfg = self.cfg
        start, model_path, step = self._resume_point()
        self.tracker = Tracker(cfg, self.out)
        engines, trainer, plan = self._start(model_path)
        history = [{"iteration": start - 1, **self.evaluate(engines)}]  # the model we start from
        self.tracker.log(history[0], step=step)
        for t in range(start, cfg.spin.iterations):
            print(f"\n===== SPIN iteration {t + 1}/{cfg.spin.iterations} =====", flush=True)
            tick = time.perf_counter()
            gen = self.generate(t, engines)  # y' ~ p_t(.|x) for every prompt x, on disk
            pairs = self.training_set(t, engines)  # (x, y, y') of iterations t, t-1, ...
            train = trainer.train(t, pairs)  # p_{t+1}: prefer y over y', against reference p_t
            weights = trainer.export(t, self.out / f"iter_{t}" / "model", cfg.sync.method == "object_store")
            step = self._record_training(t, train, step)  # checkpoint + DONE: the resume point
            sync = sync_weights(cfg.sync.method, engines, trainer, weights, plan)  # engines serve p_{t+1}
            evaluation = self.evaluate(engines)  # held-out metrics of p_{t+1}
            history.append(self._record_iteration(t, step, gen, train, sync, evaluation, tick))
        trainer.stop()
        for e in engines:
            ray.get(e.shutdown.remote())
        self.tracker.finish()
        summary = {
            "engine_starts": len(engines),
            "trainer_pids": trainer.pids,
            "history": history,
            "output_dir": str(self.out.resolve()),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _start(self, model_path: str) -> tuple[list, Trainer, list]:
        """Engines and trainer, started side by side (each takes tens of seconds), and the
        weight-sync group between them."""
        cfg = self.cfg
        engines = launch_engines(model_path, cfg.model.dtype, cfg.generation, self.p.max_model_len, cfg.run.seed)
        trainer = Trainer(cfg, model_path)
        wait_ready(engines, cfg.generation)
        plan = []
        if cfg.sync.method == "broadcast":
            tp = cfg.generation.tensor_parallel_size if cfg.generation.num_gpus else 1
            connect(trainer, engines, tp, cfg.sync.timeout_s)
            plan = plan_buckets(trainer.weight_specs(), int(cfg.sync.bucket_mb * 2**20))
        return engines, trainer, plan

    def _resume_point(self) -> tuple[int, str, int]:
        """The first iteration without a DONE marker, the model it starts from, the global step."""
        done = [t for t in range(self.cfg.spin.iterations) if (self.out / f"iter_{t}" / "DONE").exists()]
        if not done:
            return 0, self.p.model_path, 0
        last = self.out / f"iter_{max(done)}"
        print(f"[resume] iterations 1..{max(done) + 1} are done in {self.out}; continuing from there", flush=True)
        return max(done) + 1, str(last / "model"), json.loads((last / "DONE").read_text())["global_step"]

    def generate(self, t: int, engines: list) -> dict[str, float]:
        """Every training prompt answered once by the engines (which hold p_t), persisted."""
        pairs_dir = self.out / f"iter_{t}" / "pairs"
        if pairs_dir.exists():
            print(f"[generate] reusing {pairs_dir}", flush=True)
            return {}
        tick, last_print = time.perf_counter(), 0.0
        tmp = pairs_dir.with_name("pairs.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        stream = through_engines(_rows(self.p.train, self.cfg.run.seed, t), engines, self.cfg.generation)
        uids, tokens, writer = set(), 0, None
        for batch in stream.drop_columns(["engine"]).iter_batches(batch_size=None, batch_format="pyarrow"):
            writer = writer or pq.ParquetWriter(tmp / "pairs.parquet", batch.schema)
            writer.write_table(batch)
            uids.update(batch["uid"].to_pylist())
            tokens += pa.compute.sum(batch["generated_tokens"]).as_py()
            if time.perf_counter() - last_print > 5 or len(uids) == len(self.p.train):
                last_print = time.perf_counter()
                rate = tokens / (last_print - tick)
                print(f"[generate] iter {t + 1}: {len(uids)}/{len(self.p.train)} prompts, {rate:.0f} tok/s", flush=True)
        writer.close()
        if len(uids) != len(self.p.train):
            raise RuntimeError(f"generation returned {len(uids)} distinct prompts of {len(self.p.train)}")
        tmp.rename(pairs_dir)  # only complete pair sets ever carry the final name
        seconds = time.perf_counter() - tick
        return {"gen/seconds": seconds, "gen/tokens_per_s": tokens / seconds}

    def training_set(self, t: int, engines: list) -> ray.data.Dataset:
        """Iteration t's pairs plus spin.mix_previous earlier iterations', in a seeded shuffle."""
        iterations = range(max(0, t - self.cfg.spin.mix_previous), t + 1)
        columns = ["uid", "prompt_ids", "real_ids", "generated_ids"]
        table = pa.concat_tables(pq.read_table(self.out / f"iter_{i}" / "pairs", columns=columns) for i in iterations)
        order = np.random.default_rng(self.cfg.run.seed + t).permutation(table.num_rows)
        table = table.take(order)
        if self.cfg.spin.reference == "engines":
            columns = {"real_ids": "ref_real_logps", "generated_ids": "ref_generated_logps"}
            return through_engines(table, engines, self.cfg.generation, "score_batch", columns=columns)
        return ray.data.from_arrow(table)

    def evaluate(self, engines: list) -> dict[str, float]:
        """Held-out metrics of the weights the engines serve now."""
        if not self.p.eval:
            return {}
        table = _rows(self.p.eval, self.cfg.run.seed, 0)
        scored = through_engines(table, engines, self.cfg.generation, "score_batch", columns={"real_ids": "logp"})
        metrics = {"eval/logps/real": float(np.mean(scored.to_pandas()["logp"]))}
        if self.p.toy:
            from spin_ray.toy import toy_accuracy

            rows = through_engines(table, engines, self.cfg.generation, greedy=True).take_all()
            generated = {r["uid"]: r["generated"] for r in rows}
            prompts = [e.prompt_messages for e in self.p.eval]
            metrics["eval/accuracy"] = toy_accuracy(prompts, [generated[e.uid] for e in self.p.eval])
        return metrics

    def _record_training(self, t: int, train: dict[str, Any], step: int) -> int:
        """Logs the training lines and marks iteration t trained; returns the new global step."""
        for line in train["logs"]:
            metrics = {f"train/{k}": v for k, v in line.items() if k not in ("step", "iteration")}
            self.tracker.log({"iteration": t} | metrics, step=step + line["step"])
        step += train["steps"]
        (self.out / f"iter_{t}" / "DONE").write_text(json.dumps({"global_step": step}))
        return step

    def _record_iteration(
        self, t: int, step: int, gen: dict, train: dict, sync: dict, evaluation: dict, tick: float
    ) -> dict[str, Any]:
        logs = train["logs"]
        keys = [k for k in (logs[0] if logs else {}) if "/" in k or k == "loss"]
        means = {f"train/{k}": float(np.mean([line[k] for line in logs])) for k in keys}
        row = {
            "iteration": t,
            "global_step": step,
            **gen,
            **sync,
            **means,
            "train/seconds": train["seconds"],
            **evaluation,
            "time/iteration_s": time.perf_counter() - tick,
        }
        self.tracker.log(row, step=step)
        return row


def run_job(cfg: Config, prepared: Prepared) -> dict[str, Any]:
    """Runs the coordinator as an actor on the driver's node (the head, under `ray job submit`),
    so it needs no GPU node to exist; returns its summary."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    coordinator = ray.remote(num_cpus=0, scheduling_strategy=here)(Coordinator).remote(cfg, prepared)
    return ray.get(coordinator.run.remote())
