"""The SPIN loop as one Ray job: long-lived engines and trainer, one coordinator actor.

`prepare()` does every cheap check (config, model, data) before anything expensive starts;
`Coordinator.run()` is the paper's algorithm, iteration by iteration.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from spin_ray.config import Config
from spin_ray.console import Console, Progress, iteration_line, name_log
from spin_ray.data import Example, load_sft
from spin_ray.evaluation import answer_metrics, load_hooks, run_hooks
from spin_ray.generation import sample_seed, through_engines
from spin_ray.health import Engines
from spin_ray.report import write_report
from spin_ray.resume import check_unchanged, fingerprint, record, resume_point
from spin_ray.serving import key_digest, live_endpoint
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
    serve_key_digest: str | None = None  # serve.live's bearer key, hashed: the key stays in the driver


def prepare(cfg: Config) -> Prepared:
    from transformers import AutoConfig, AutoTokenizer

    load_hooks(cfg.eval.hooks)  # a typo in a hook's name fails now, not after the first iteration
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
    digest = key_digest(os.environ.get(cfg.serve.api_key_env))
    return Prepared(model_path, train, evaluation, toy, max_model_len, data_fingerprint, digest)


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
        self.progress = Progress(cfg.spin.iterations)
        self.hooks = load_hooks(cfg.eval.hooks)
        self.stop_live: Callable[[], None] = lambda: None
        name_log("coordinator")
        record(cfg, prepared.fingerprint)
        (self.out / "summary.json").unlink(missing_ok=True)  # a resumed run is not finished until it ends

    def run(self) -> dict[str, Any]:
        """SPIN (Chen et al. 2024, Algorithm 1): iteration t trains p_t against p_{t-1}."""
        cfg = self.cfg
        uids = {e.uid for e in self.p.train}
        start, model_path, step = astuple(resume_point(cfg, self.p.model_path, uids, self.progress.say))
        self.tracker = Tracker(cfg, self.out, resume_from=start)
        engines, trainer = Engines(cfg, model_path, self.p.max_model_len), None  # engines load meanwhile
        try:
            trainer = self.start(engines, model_path)
            history = [{"iteration": start - 1, **self.evaluate(start - 1, engines, model_path)}]  # where we start
            if start == 1:  # a resumed run logged this row when the iteration before ended
                self.tracker.log(history[0], step=step)
            for t in range(start, cfg.spin.iterations + 1):
                tick = time.perf_counter()
                gen = self.generate(t, engines)  # y' ~ p_{t-1}(.|x) for every prompt x, on disk
                pairs = self.training_set(t, engines)  # (x, y, y') of iterations t, t-1, ...
                train = self.train(t, trainer, pairs)  # p_t: prefer y over y', against reference p_{t-1}
                model_dir, weights = self.export(t, trainer)  # p_t as a HF checkpoint
                step = self._record_training(t, train, step)  # + DONE: the resume point
                sync = self.sync(t, engines, model_dir, trainer, weights)  # the engines serve p_t
                evaluation = self.evaluate(t, engines, str(model_dir))  # held-out metrics of p_t
                history.append(self._record_iteration(t, step, gen, train, sync, evaluation, tick))
        finally:  # whatever happened, nothing keeps running (or holding GPUs) after the job
            self._shutdown(engines, trainer)
        return self._summary(history, engines, trainer)

    def progress_since(self, cursor: int) -> list[dict[str, Any]]:
        """What the driver's console has not drawn yet (called while `run` works)."""
        return self.progress.read(cursor)

    def start(self, engines: Engines, model_path: str) -> Trainer:
        with self.progress.phase(0, "start-up", None, ""):
            trainer = Trainer(self.cfg, model_path)
            engines.wait_ready()
        self.stop_live = live_endpoint(self.cfg, engines.pool, model_path, self.p.serve_key_digest, self.progress.say)
        ip = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        on = [ip.get(e["node"], "?") for e in engines.stats()["engines"]]
        self.progress.say(
            f"  engines on {', '.join(on)}; train ranks on {', '.join(ip.get(n, '?') for n in trainer.nodes)}"
        )
        return trainer

    def _shutdown(self, engines: Engines, trainer: Trainer | None) -> None:
        """Best effort: a failure while cleaning up must not hide the error that ended the run."""
        for stop in (self.stop_live, trainer.stop if trainer else None, engines.shutdown, self.tracker.finish):
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
        self._report()  # now says "finished"
        return summary

    def generate(self, t: int, engines: Engines) -> dict[str, float]:
        """Every training prompt answered once by the engines (which hold p_{t-1}), persisted."""
        pairs_dir = self.out / f"iter_{t}" / "pairs"
        if self.cfg.spin.objective == "sft":  # the baseline trains on the real answers only
            return {}
        if pairs_dir.exists():
            self.progress.say(f"[{t}/{self.cfg.spin.iterations}] generate: reusing {pairs_dir}")
            return {}
        tick = time.perf_counter()
        tmp = pairs_dir.with_name("pairs.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        rows = _rows(self.p.train, self.cfg.run.seed, t)
        uids, tokens, writer = set(), 0, None
        with self.progress.phase(t, "generate", rows.num_rows, "prompts") as advance:
            for batch in self._stream(rows, engines, advance):
                writer = writer or pq.ParquetWriter(tmp / "pairs.parquet", batch.schema)
                writer.write_table(batch)
                uids.update(batch["uid"].to_pylist())
                tokens += pa.compute.sum(batch["generated_tokens"]).as_py()
        writer.close()
        if len(uids) != len(self.p.train):
            raise RuntimeError(f"generation returned {len(uids)} distinct prompts of {len(self.p.train)}")
        tmp.rename(pairs_dir)  # only complete pair sets ever carry the final name
        seconds = time.perf_counter() - tick
        return {"gen/seconds": seconds, "gen/tokens_per_s": tokens / seconds}

    def training_set(self, t: int, engines: Engines) -> ray.data.Dataset:
        table = self.training_table(t)
        if self.cfg.spin.reference == "engines" and self.cfg.spin.objective == "spin":
            columns = {"real_ids": "ref_real_logps", "generated_ids": "ref_generated_logps"}  # log p_{t-1}
            with self.progress.phase(t, "reference", table.num_rows, "pairs") as advance:
                table = pa.concat_tables(self._stream(table, engines, advance, "score_batch", columns=columns))
        return ray.data.from_arrow(table)

    def training_table(self, t: int) -> pa.Table:
        """Iteration t's pairs plus spin.mix_previous earlier iterations', in a seeded shuffle. The
        SFT baseline gets the same rows in the same order, without the generated side."""
        iterations = range(max(1, t - self.cfg.spin.mix_previous), t + 1)
        if self.cfg.spin.objective == "sft":
            columns = ["uid", "prompt_ids", "real_ids"]
            tables = [_rows(self.p.train, self.cfg.run.seed, i).select(columns) for i in iterations]
        else:
            columns = ["uid", "prompt_ids", "real_ids", "generated_ids"]
            tables = [pq.read_table(self.out / f"iter_{i}" / "pairs", columns=columns) for i in iterations]
        return shuffled(tables, self.cfg.run.seed + t)

    def train(self, t: int, trainer: Trainer, pairs: ray.data.Dataset) -> dict[str, Any]:
        with self.progress.phase(t, "train", None, "steps") as advance:
            return trainer.train(t, pairs, on_progress=advance)

    def export(self, t: int, trainer: Trainer) -> tuple[Path, ray.ObjectRef | None]:
        model_dir = self.out / f"iter_{t}" / "model"
        with self.progress.phase(t, "export", None, "checkpoint"):
            return model_dir, trainer.export(model_dir, self.cfg.sync.method == "object_store")

    def sync(self, t: int, engines: Engines, model_dir: Path, trainer: Trainer, weights: Any) -> dict[str, float]:
        with self.progress.phase(t, "sync", self.cfg.generation.num_engines, "engines") as advance:
            sync = engines.serve(str(model_dir), trainer, weights)
            advance(self.cfg.generation.num_engines)
        return sync

    def evaluate(self, t: int, engines: Engines, model_dir: str) -> dict[str, float]:
        """Held-out metrics of the weights the engines serve now (p_t), then the user's hooks."""
        if not self.p.eval:
            return run_hooks(self.hooks, model_dir, t, self.progress.say)
        table = _rows(self.p.eval, self.cfg.run.seed, 0)  # the same sampling seeds every iteration
        n = table.num_rows
        with self.progress.phase(t, "eval", 3 * n, "prompts") as advance:
            sampled = pa.concat_tables(self._stream(table, engines, advance))
            columns = {"real_ids": "logp_real", "generated_ids": "logp_generated"}
            scored = pa.concat_tables(
                self._stream(sampled, engines, lambda k: advance(n + k), "score_batch", columns=columns)
            ).sort_by("uid")
            greedy = pa.concat_tables(self._stream(table, engines, lambda k: advance(2 * n + k), greedy=True))
            greedy = dict(zip(greedy["uid"].to_pylist(), greedy["generated"].to_pylist(), strict=True))
            examples = sorted(self.p.eval, key=lambda e: e.uid)
            answers = [greedy[e.uid] for e in examples]
            metrics = answer_metrics(
                scored["logp_real"].to_numpy(),
                scored["logp_generated"].to_numpy(),
                [e.real_ids for e in examples],
                scored["generated_ids"].to_pylist(),
                answers,
                [e.real for e in examples],
            )
            if self.p.toy:
                from spin_ray.toy import toy_accuracy

                metrics["eval/accuracy"] = toy_accuracy([e.prompt_messages for e in examples], answers)
            return metrics | run_hooks(self.hooks, model_dir, t, self.progress.say)

    def _stream(
        self, table: pa.Table, engines: Engines, advance: Callable[[int], None], method: str = "generate", **kw: Any
    ) -> Iterator[pa.Table]:
        """`table`'s rows through the engines' `method`, batch by batch as they finish."""
        done = 0
        stream = through_engines(table, engines.pool, self.cfg.generation, method, **kw)
        for batch in stream.iter_batches(batch_size=None, batch_format="pyarrow"):
            done += batch.num_rows
            advance(done)
            yield batch

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
            **self.progress.seconds.get(t, {}),
            "time/iteration_s": time.perf_counter() - tick,
        }
        self.tracker.log(row, step=step)
        self.progress.say(iteration_line(row, self.cfg.spin.iterations))
        self._report()
        return row

    def _report(self) -> None:
        try:  # the report is for reading, never a reason to stop the run
            write_report(self.out)
        except Exception as e:  # noqa: BLE001
            self.progress.say(f"[report] could not write {self.out / 'report.html'}: {e!r}")


def run_job(cfg: Config, prepared: Prepared, console: Console | None = None) -> dict[str, Any]:
    """Runs the coordinator as an actor on the driver's node (the head, under `ray job submit`),
    so it needs no GPU node to exist; draws its progress and returns its summary."""
    console = console or Console(Path(cfg.run.output_dir), tty=False)
    # Two threads: `run` works while the driver's console polls `progress_since`.
    actor = ray.remote(num_cpus=0, max_concurrency=2, scheduling_strategy=on_this_node())(Coordinator)
    coordinator = actor.remote(cfg, prepared)
    return console.follow(coordinator.run.remote(), coordinator.progress_since.remote)
