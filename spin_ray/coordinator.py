"""The SPIN loop as one Ray job: long-lived engines and trainer, one coordinator actor.

`prepare()` does every cheap check (config, model, data) before anything expensive starts;
`Coordinator.run()` is the paper's algorithm, iteration by iteration.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import resource
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from spin_ray.config import Config
from spin_ray.console import Console, Progress, iteration_line, name_log
from spin_ray.data import Example, TrainingSet, load_sft, read_sft, write_permuted, write_training_set
from spin_ray.evaluation import answer_metrics, load_hooks, run_hooks
from spin_ray.generation import sample_seed, through_engines, warm_up
from spin_ray.health import Engines
from spin_ray.pairs import REFERENCE, Generation, PairStream, pair_stream, scored_rows
from spin_ray.report import write_report
from spin_ray.resume import check_unchanged, record, resume_point, sorted_uids
from spin_ray.serving import key_digest, live_endpoint
from spin_ray.tracking import Tracker
from spin_ray.training import Trainer, on_this_node


def streaming_allocators() -> None:
    """Memory the coordinator frees goes back, so it stays flat however many prompts stream
    through it in small batches on several threads. Arrow's default allocator (mimalloc) keeps
    the pages of freed buffers, and glibc's arenas (one per thread) rarely give theirs back: the
    coordinator grew with the data (+29 MB from 5,000 to 50,000 toy prompts). Done in this process
    only: environment variables in its runtime_env would reach every engine and train worker."""
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return

    def trim_every_second() -> None:
        while True:
            trim(0)
            time.sleep(1.0)

    threading.Thread(target=trim_every_second, name="malloc-trim", daemon=True).start()


# vLLM's CPU attention kernels reject other head sizes, and only after ~40 s of start-up.
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 256)


@dataclass
class Prepared:
    """What a run needs, checked in the driver before Ray, engines or trainers start."""

    model_path: str
    train: TrainingSet  # on disk, under run.output_dir/data
    eval: list[Example]  # held out: small, and read every iteration
    toy: bool
    max_model_len: int
    serve_key_digest: str | None = None  # serve.live's bearer key, hashed: the key stays in the driver


def prepare(cfg: Config, dry_run: bool = False) -> Prepared:
    """A dry run checks and counts the training data without writing it anywhere."""
    from transformers import AutoConfig, AutoTokenizer

    load_hooks(cfg.eval.hooks)  # a typo in a hook's name fails now, not after the first iteration
    toy = cfg.model.path == "toy"
    model_path, train_path, eval_path = cfg.model.path, cfg.data.train_path, cfg.data.eval_path
    if toy:
        from spin_ray.toy import toy_world

        world = toy_world(cfg.run.seed)
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
    longest = max(d.max_response_tokens, cfg.generation.max_tokens)
    max_model_len = cfg.generation.max_model_len or d.max_prompt_tokens + longest + 1
    if max_model_len > getattr(model_config, "max_position_embeddings", max_model_len):
        raise ValueError(
            f"data.max_prompt_tokens + max(data.max_response_tokens, generation.max_tokens) = {max_model_len - 1} "
            f"exceeds the model's max_position_embeddings ({model_config.max_position_embeddings}): lower them"
        )
    load = dict(
        max_prompt_tokens=d.max_prompt_tokens, max_response_tokens=d.max_response_tokens, long_prompts=d.long_prompts
    )
    evaluation = load_sft(eval_path, tokenizer, **load) if eval_path else []
    train = _training_set(cfg, read_sft(train_path, tokenizer, dedupe=d.dedupe, **load), dry_run)
    digest = key_digest(os.environ.get(cfg.serve.api_key_env))
    return Prepared(model_path, train, evaluation, toy, max_model_len, digest)


def _training_set(cfg: Config, examples: Iterator[Example], dry_run: bool) -> TrainingSet:
    """Writes the training set to run.output_dir/data/train.parquet (a dry run only counts it).
    Bad data, or data other than a stored run's, leaves nothing behind: the file is written
    beside the stored one and replaces it only once everything checks out."""
    out = Path(cfg.run.output_dir)
    fresh = not out.exists()
    tmp = None if dry_run else out / "data" / "train.parquet.tmp"
    try:
        if tmp:
            tmp.parent.mkdir(parents=True, exist_ok=True)
        train = write_training_set(examples, tmp, cfg.data.max_examples)
        check_unchanged(cfg, train.fingerprint)
    except BaseException:
        if tmp:
            tmp.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a data dir of our own making, now empty
                tmp.parent.rmdir()
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return replace(train, path=tmp.replace(tmp.with_suffix(""))) if tmp else train


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
    def __init__(self, cfg: Config, prepared: Prepared, marks: dict[str, float] | None = None):
        self.cfg = cfg
        self.p = prepared
        # When each start-up step was done (epoch seconds), from the driver's launch on.
        self.marks = (marks or {"launch": time.time()}) | {"coordinator": time.time()}
        self.out = Path(cfg.run.output_dir)
        self.progress = Progress(cfg.spin.iterations)
        self.hooks = load_hooks(cfg.eval.hooks)
        self.stop_live: Callable[[], None] = lambda: None
        self._beside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluate")
        self.generating = threading.Event()  # the first iteration's first pairs are made (or none are needed)
        name_log("coordinator")
        streaming_allocators()
        record(cfg, prepared.train.fingerprint)
        (self.out / "summary.json").unlink(missing_ok=True)  # a resumed run is not finished until it ends

    def run(self) -> dict[str, Any]:
        """SPIN (Chen et al. 2024, Algorithm 1): iteration t trains p_t against p_{t-1}."""
        cfg = self.cfg
        uids = sorted_uids(self.p.train.path)
        start, model_path, step = astuple(resume_point(cfg, self.p.model_path, uids, self.progress.say))
        self.tracker = Tracker(cfg, self.out, resume_from=start)
        engines, trainer = Engines(cfg, model_path, self.p.max_model_len), None  # engines load meanwhile
        threading.Thread(target=warm_up, args=(cfg.generation,), daemon=True).start()
        history: list[dict[str, Any]] = []
        try:
            trainer = self.start(engines, model_path)  # once the engines are up; the ranks start meanwhile
            row = self.beside(self._start_row, start - 1, engines, model_path, step)  # where we start
            for t in range(start, cfg.spin.iterations + 1):
                tick = time.perf_counter()
                new = self.generate(t, engines)  # y' ~ p_{t-1}(.|x) for every prompt x, to disk as it comes
                pairs = self.training_set(t, new, engines)  # (x, y, y') of iterations t, t-1, ...
                train = self.train(t, trainer, pairs)  # p_t: prefer y over y', against reference p_{t-1}
                gen = self.stored(t, new)  # every pair on disk under its final name
                model_dir, weights = self.export(t, trainer)  # p_t as a HF checkpoint
                history.append(row.result())  # p_{t-1}'s row: evaluated before the swap, logged before p_t's
                step = self._record_training(t, train, step)  # + DONE: the resume point
                sync = self.sync(t, engines, model_dir, trainer, weights)  # the engines serve p_t
                row = self.beside(self._iteration_row, t, engines, str(model_dir), step, gen, train, sync, tick)
            history.append(row.result())
            self.marks["done"] = time.time()
        finally:  # whatever happened, nothing keeps running (or holding GPUs) after the job
            self._shutdown(engines, trainer)
        return self._summary(history, engines, trainer)

    def beside(self, fn: Callable[..., dict[str, Any]], *args: Any) -> Future:
        """Runs `fn` (an evaluation) beside the next iteration's generation and training."""
        return self._beside.submit(fn, *args)

    def progress_since(self, cursor: int) -> list[dict[str, Any]]:
        """What the driver's console has not drawn yet (called while `run` works)."""
        return self.progress.read(cursor)

    def start(self, engines: Engines, model_path: str) -> Trainer:
        """Returns once the engines are up: generation and the start model's evaluation need
        nothing else. The train ranks start meanwhile; the first training waits for them."""
        trainer = Trainer(self.cfg, model_path)
        with self.progress.phase(0, "start-up", None, ""):
            engines.wait_ready()
        self.marks["engines_ready"] = time.time()
        self.stop_live = live_endpoint(self.cfg, engines.pool, model_path, self.p.serve_key_digest, self.progress.say)
        self.progress.say(f"  engines on {', '.join(self._ips(e['node'] for e in engines.stats()['engines']))}")
        return trainer

    @staticmethod
    def _ips(node_ids: Iterable[str]) -> list[str]:
        ip = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        return [ip.get(n, "?") for n in node_ids]

    def _shutdown(self, engines: Engines, trainer: Trainer | None) -> None:
        """Best effort: a failure while cleaning up must not hide the error that ended the run."""
        self._beside.shutdown(wait=False, cancel_futures=True)
        self.generating.set()  # a start evaluation waiting for pairs that never came ends
        stops = [self.stop_live, engines.shutdown, self.tracker.finish] + ([trainer.stop] if trainer else [])
        with ThreadPoolExecutor(len(stops)) as pool:  # side by side: each waits on other processes
            for stop in stops:
                pool.submit(stop)  # an error here is dropped: the run's own error is the one to see

    def _summary(self, history: list[dict], engines: Engines, trainer: Trainer) -> dict[str, Any]:
        summary = {
            **engines.stats(),  # engine_starts counts distinct engine processes: a restart shows
            "trainer_pids": trainer.pids,
            "trainer_nodes": trainer.nodes,
            "trainer_restarts": trainer.restarts,
            "history": history,
            "output_dir": str(self.out.resolve()),
            "coordinator_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            # seconds from launch; trainer_ready: the last rank's; first_pair: on disk
            "startup_s": {k: v - self.marks["launch"] for k, v in self.marks.items() if k != "launch"},
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self._report()  # now says "finished"
        return summary

    def generate(self, t: int, engines: Engines) -> Generation | None:
        """Every training prompt answered once by the engines (which hold p_{t-1}), written to
        disk batch by batch on a thread; None when there is nothing to generate. Without
        spin.stream, waits until every pair is stored."""
        pairs_dir = self.out / f"iter_{t}" / "pairs"
        if self.cfg.spin.objective == "sft" or pairs_dir.exists():  # the baseline trains on real answers only
            if pairs_dir.exists():
                self.progress.say(f"[{t}/{self.cfg.spin.iterations}] generate: reusing {pairs_dir}")
            self.generating.set()
            return None
        answers = self._answers(t, engines, pairs_dir.with_name("prompts.tmp"))
        new = Generation(answers, pairs_dir.with_name("pairs.tmp"), self.p.train.records)
        new.on_first_part = lambda: (self.marks.setdefault("first_pair", time.time()), self.generating.set())
        if not self.cfg.spin.stream:
            self.stored(t, new)
        return new

    def stored(self, t: int, new: Generation | None) -> dict[str, float]:
        """Waits until iteration t's pairs are all on disk and gives them their final name (only
        complete pair sets carry it); returns the generation metrics."""
        if new is None:
            return {}
        gen = new.wait()
        if new.tmp.exists():  # not renamed by the sequential mode's call
            new.tmp.rename(new.tmp.with_name("pairs"))
        shutil.rmtree(new.tmp.with_name("prompts.tmp"), ignore_errors=True)
        return gen

    def _prompts(self, t: int, dest: Path) -> list[Path]:
        """Iteration t's prompts in a seeded permutation (pairs.py, 1.), with their sampling seeds,
        as files of one generation batch each."""
        seed = self.cfg.run.seed

        def with_seeds(table: pa.Table) -> pa.Table:
            seeds = [sample_seed(seed, t, uid) for uid in table["uid"].to_pylist()]
            return table.append_column("seed", pa.array(seeds, pa.int64()))

        order = np.random.default_rng(seed + t).permutation(self.p.train.records)
        return write_permuted(self.p.train.path, order, dest, self.cfg.generation.batch_size, with_seeds)

    def training_set(self, t: int, new: Generation | None, engines: Engines) -> ray.data.Dataset | PairStream:
        """The pairs p_t trains on: iteration t's and spin.mix_previous earlier iterations'.
        Streamed (spin.stream, see spin_ray.pairs) or, sequentially, a seeded shuffle of them all."""
        iterations = range(max(1, t - self.cfg.spin.mix_previous), t + 1)
        if self.cfg.spin.streams:
            return self._stream_set(t, new, iterations, engines)
        table = self.training_table(t)
        if self.cfg.spin.reference == "engines" and self.cfg.spin.objective == "spin":
            with self.progress.phase(t, "reference", table.num_rows, "pairs") as advance:
                table = pa.concat_tables(self._stream(table, engines, advance, "score_batch", columns=REFERENCE))
        return ray.data.from_arrow(table)

    def _stream_set(self, t: int, new: Generation | None, iterations: range, engines: Engines) -> PairStream:
        stored = [self.out / f"iter_{i}" / "pairs" for i in iterations if new is None or i < t]
        score = None
        if self.cfg.spin.reference == "engines":  # log p_{t-1}, while the engines still hold p_{t-1}
            score = functools.partial(scored_rows, pool=engines.pool, cfg=self.cfg.generation)
        s = self.cfg.spin
        return pair_stream(stored, new, self.cfg.run.seed + t, s.shuffle_window, self.cfg.train.batch_size, score)

    def training_table(self, t: int) -> pa.Table:
        """Iteration t's pairs plus spin.mix_previous earlier iterations', in a seeded shuffle. The
        SFT baseline gets the same rows in the same order, without the generated side."""
        iterations = range(max(1, t - self.cfg.spin.mix_previous), t + 1)
        if self.cfg.spin.objective == "sft":
            tables = [pq.read_table(self.p.train.path, columns=["uid", "prompt_ids", "real_ids"])] * len(iterations)
        else:
            columns = ["uid", "prompt_ids", "real_ids", "generated_ids"]
            tables = [pq.read_table(self.out / f"iter_{i}" / "pairs", columns=columns) for i in iterations]
        return shuffled(tables, self.cfg.run.seed + t)

    def train(self, t: int, trainer: Trainer, pairs: ray.data.Dataset | PairStream) -> dict[str, Any]:
        with self.progress.phase(t, "train", None, "steps") as advance:
            result = trainer.train(t, pairs, on_progress=advance)
        if "trainer_ready" not in self.marks:
            self.marks["trainer_ready"] = trainer.ready_at()
        return result | {"ended": time.perf_counter()}

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
            columns = {"real_ids": "logp_real", "generated_ids": "logp_generated"}  # under p_t
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

    def _answers(self, t: int, engines: Engines, prompts_dir: Path) -> Iterator[pa.Table]:
        """Iteration t's prompts through the engines, as a phase of its own: it starts (on the
        Generation's thread) when first read."""
        with self.progress.phase(t, "generate", self.p.train.records, "prompts") as advance:
            yield from self._stream(self._prompts(t, prompts_dir), engines, advance)

    def _stream(
        self,
        rows: pa.Table | list[Path],
        engines: Engines,
        advance: Callable[[int], None],
        method: str = "generate",
        **kw: Any,
    ) -> Iterator[pa.Table]:
        """`rows` through the engines' `method`, batch by batch as they finish."""
        done = 0
        stream = through_engines(rows, engines.pool, self.cfg.generation, method, **kw)
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

    def _start_row(self, t: int, engines: Engines, model_dir: str, step: int) -> dict[str, Any]:
        # The engines take work in order: the first pairs (which training waits for) go first.
        self.generating.wait()
        row = {"iteration": t, **self.evaluate(t, engines, model_dir)}
        self.marks["start_evaluated"] = time.time()
        if t == 0:  # a resumed run logged this row when the iteration before ended
            self.tracker.log(row, step=step)
        return row

    def _iteration_row(
        self, t: int, engines: Engines, model_dir: str, step: int, gen: dict, train: dict, sync: dict, tick: float
    ) -> dict[str, Any]:
        """Evaluates p_t and logs iteration t's row (on the `beside` thread)."""
        evaluation = self.evaluate(t, engines, model_dir)
        self.marks.setdefault("first_iteration", time.time())
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
            "time/to_trained_s": train["ended"] - tick,  # generation and training, overlapped or not
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


def run_job(
    cfg: Config, prepared: Prepared, console: Console | None = None, marks: dict[str, float] | None = None
) -> dict[str, Any]:
    """Runs the coordinator as an actor on the driver's node (the head, under `ray job submit`),
    so it needs no GPU node to exist; draws its progress and returns its summary."""
    console = console or Console(Path(cfg.run.output_dir), tty=False)
    # Two threads: `run` works while the driver's console polls `progress_since`.
    actor = ray.remote(num_cpus=0, max_concurrency=2, scheduling_strategy=on_this_node())(Coordinator)
    coordinator = actor.remote(cfg, prepared, marks)
    return console.follow(coordinator.run.remote(), coordinator.progress_since.remote)
