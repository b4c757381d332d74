"""The SPIN loop as one Ray job: long-lived engines and trainer, one coordinator actor.

`prepare()` does every cheap check (config, model, data) before anything expensive starts;
`Coordinator.run()` is the paper's algorithm, iteration by iteration.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from spin_ray.config import Config
from spin_ray.data import Example, load_sft
from spin_ray.generation import sample_seed, through_engines
from spin_ray.health import Engines
from spin_ray.resume import check_unchanged, fingerprint, record, resume_point
from spin_ray.tracking import Tracker
from spin_ray.training import Trainer, on_this_node

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
    fingerprint: str  # of the training data, to refuse resuming a run made on other data


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
    train = load_sft(train_path, tokenizer, dedupe=d.dedupe, max_examples=d.max_examples, **load)
    evaluation = load_sft(eval_path, tokenizer, **load) if eval_path else []
    longest = max(d.max_response_tokens, cfg.generation.max_tokens)
    max_model_len = cfg.generation.max_model_len or d.max_prompt_tokens + longest + 1
    if max_model_len > getattr(model_config, "max_position_embeddings", max_model_len):
        raise ValueError(
            f"data.max_prompt_tokens + max(data.max_response_tokens, generation.max_tokens) = {max_model_len - 1} "
            f"exceeds the model's max_position_embeddings ({model_config.max_position_embeddings}): lower them"
        )
    data_fingerprint = fingerprint(train)
    check_unchanged(cfg, data_fingerprint)
    return Prepared(model_path, train, evaluation, toy, max_model_len, data_fingerprint)


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


def shuffled(tables: list[pa.Table], seed: int) -> pa.Table:
    """The pairs of several iterations in a seeded order. Pairs are written in the order the
    engines finish them; sorting each iteration's by uid first makes the order, and so the
    trained weights, independent of timing."""
    table = pa.concat_tables(tbl.sort_by("uid") for tbl in tables)
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


class Coordinator:
    def __init__(self, cfg: Config, prepared: Prepared):
        self.cfg = cfg
        self.p = prepared
        self.out = Path(cfg.run.output_dir)
        record(cfg, prepared.fingerprint)

    def run(self) -> dict[str, Any]:
        """SPIN (Chen et al. 2024, Algorithm 1), one iteration per loop turn."""
        cfg = self.cfg
        start, model_path, step = astuple(resume_point(cfg, self.p.model_path, {e.uid for e in self.p.train}))
        self.tracker = Tracker(cfg, self.out, resume_from=start)
        engines, trainer = Engines(cfg, model_path, self.p.max_model_len), None  # engines load meanwhile
        try:
            trainer = Trainer(cfg, model_path)
            engines.wait_ready()
            history = [{"iteration": start - 1, **self.evaluate(engines)}]  # the model we start from
            if start == 0:  # a resumed run logged this row when the iteration before ended
                self.tracker.log(history[0], step=step)
            for t in range(start, cfg.spin.iterations):
                print(f"\n===== SPIN iteration {t + 1}/{cfg.spin.iterations} =====", flush=True)
                tick = time.perf_counter()
                gen = self.generate(t, engines)  # y' ~ p_t(.|x) for every prompt x, on disk
                pairs = self.training_set(t, engines)  # (x, y, y') of iterations t, t-1, ...
                train = trainer.train(t, pairs)  # p_{t+1}: prefer y over y', against reference p_t
                model_dir = self.out / f"iter_{t}" / "model"
                weights = trainer.export(model_dir, cfg.sync.method == "object_store")
                step = self._record_training(t, train, step)  # checkpoint + DONE: the resume point
                sync = engines.serve(str(model_dir), trainer, weights)  # engines serve p_{t+1}
                evaluation = self.evaluate(engines)  # held-out metrics of p_{t+1}
                history.append(self._record_iteration(t, step, gen, train, sync, evaluation, tick))
        finally:  # whatever happened, nothing keeps running (or holding GPUs) after the job
            self._shutdown(engines, trainer)
        return self._summary(history, engines, trainer)

    def _shutdown(self, engines: Engines, trainer: Trainer | None) -> None:
        """Best effort: a failure while cleaning up must not hide the error that ended the run."""
        for stop in (trainer.stop if trainer else None, engines.shutdown, self.tracker.finish):
            if stop is not None:
                with contextlib.suppress(Exception):
                    stop()

    def _summary(self, history: list[dict], engines: Engines, trainer: Trainer) -> dict[str, Any]:
        summary = {
            **engines.stats(),  # engine_starts counts distinct engine processes: a restart shows
            "trainer_pids": trainer.pids,
            "trainer_nodes": trainer.nodes,
            "trainer_restarts": trainer.restarts,
            "history": history,
            "output_dir": str(self.out.resolve()),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def generate(self, t: int, engines: Engines) -> dict[str, float]:
        """Every training prompt answered once by the engines (which hold p_t), persisted."""
        pairs_dir = self.out / f"iter_{t}" / "pairs"
        if pairs_dir.exists():
            print(f"[generate] reusing {pairs_dir}", flush=True)
            return {}
        tick, last_print = time.perf_counter(), 0.0
        tmp = pairs_dir.with_name("pairs.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        stream = through_engines(_rows(self.p.train, self.cfg.run.seed, t), engines.pool, self.cfg.generation)
        uids, tokens, writer = set(), 0, None
        for batch in stream.iter_batches(batch_size=None, batch_format="pyarrow"):
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

    def training_set(self, t: int, engines: Engines) -> ray.data.Dataset:
        """Iteration t's pairs plus spin.mix_previous earlier iterations', in a seeded shuffle."""
        iterations = range(max(0, t - self.cfg.spin.mix_previous), t + 1)
        columns = ["uid", "prompt_ids", "real_ids", "generated_ids"]
        tables = [pq.read_table(self.out / f"iter_{i}" / "pairs", columns=columns) for i in iterations]
        table = shuffled(tables, self.cfg.run.seed + t)
        if self.cfg.spin.reference == "engines":
            columns = {"real_ids": "ref_real_logps", "generated_ids": "ref_generated_logps"}
            return through_engines(table, engines.pool, self.cfg.generation, "score_batch", columns=columns)
        return ray.data.from_arrow(table)

    def evaluate(self, engines: Engines) -> dict[str, float]:
        """Held-out metrics of the weights the engines serve now."""
        if not self.p.eval:
            return {}
        table = _rows(self.p.eval, self.cfg.run.seed, 0)
        scored = through_engines(table, engines.pool, self.cfg.generation, "score_batch", columns={"real_ids": "logp"})
        metrics = {"eval/logps/real": float(np.mean(scored.to_pandas()["logp"]))}
        if self.p.toy:
            from spin_ray.toy import toy_accuracy

            rows = through_engines(table, engines.pool, self.cfg.generation, greedy=True).take_all()
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
    coordinator = ray.remote(num_cpus=0, scheduling_strategy=on_this_node())(Coordinator).remote(cfg, prepared)
    return ray.get(coordinator.run.remote())
