"""The SPIN loop as one Ray job: long-lived engines and trainer, one coordinator actor.

`Coordinator.run()` is the paper's algorithm, iteration by iteration; the driver checked
everything cheap before (spin_ray.driver.prepare). Each step is a method below it, and each
method hands the next a typed result (spin_ray.stages).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import resource
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from spin_ray.card import card
from spin_ray.cluster import ActorLost, dead
from spin_ray.config import Config
from spin_ray.engines.client import Engines, run_batch, warm_up
from spin_ray.logs import name_log
from spin_ray.loop.evaluate import Evaluator
from spin_ray.loop.generate import answered, write_prompts
from spin_ray.loop.progress import Progress, iteration_line
from spin_ray.loop.resume import record, resume_point, sorted_uids
from spin_ray.loop.sync import WeightSync
from spin_ray.lora import merge
from spin_ray.pairs import Generation, PairStream, Row, pair_stream
from spin_ray.report import write_report
from spin_ray.rundir import RunDir, write_atomic
from spin_ray.serve.app import live_endpoint
from spin_ray.stages import Generated, IterationDone, Prepared, Synced, Trained, distinct_only
from spin_ray.tracking import Tracker, read_metrics
from spin_ray.trainer.supervisor import Trainer

REFERENCE = {"real_ids": "ref_real_logps", "generated_ids": "ref_generated_logps"}  # log p_{t-1}, by the engines


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


class Coordinator:
    def __init__(
        self, cfg: Config, prepared: Prepared, marks: dict[str, float] | None = None, wandb_key: str | None = None
    ):
        if wandb_key:  # in this process's environment alone: W&B runs here, and no process Ray starts inherits it
            os.environ["WANDB_API_KEY"] = wandb_key
        self.cfg = cfg
        self.p = prepared
        # When each start-up step was done (epoch seconds), from the driver's launch on.
        self.marks = (marks or {"launch": time.time()}) | {"coordinator": time.time()}
        self.run_dir = RunDir(cfg.run.output_dir)
        self.progress = Progress(cfg.spin.iterations)
        self.stop_live: Callable[[], None] = lambda: None
        self._beside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluate")
        self.generating = threading.Event()  # the first iteration's first pairs are made (or none are needed)
        name_log("coordinator")
        streaming_allocators()
        record(cfg, prepared.train.fingerprint, prepared.inputs)
        self.run_dir.summary.unlink(missing_ok=True)  # a resumed run is not finished until it ends

    def run(self) -> dict[str, Any]:
        """SPIN (Chen et al. 2024, Algorithm 1): iteration t trains p_t against p_{t-1}."""
        cfg = self.cfg
        uids = sorted_uids(self.p.train.path)
        start, model_path, step = astuple(resume_point(cfg, self.p.model_path, uids, self.progress.say))
        self.tracker = Tracker(cfg, self.run_dir.root, resume_from=start)
        engines, trainer = Engines(cfg, model_path, self.p.max_model_len), None  # engines load meanwhile
        threading.Thread(target=warm_up, args=(cfg.generation,), daemon=True).start()
        history: list[dict[str, Any]] = []
        try:
            trainer = self.start(engines, model_path, start - 1)  # once the engines are up; the ranks start meanwhile
            sync, evaluate = WeightSync(cfg, engines, trainer), Evaluator(cfg, self.p, engines, self.progress)
            row = self.beside(self._start_row, start - 1, evaluate, model_path, step)  # where we start
            for t in range(start, cfg.spin.iterations + 1):
                tick = time.perf_counter()
                new = self.generate(t, engines)  # y' ~ p_{t-1}(.|x) for every prompt x, to disk as it comes
                pairs = self.training_set(t, new, engines)  # (x, y, y') of iterations t, t-1, ... as a stream
                trained, trained_at = self.train(t, trainer, pairs)  # p_t: prefer y over y', against p_{t-1}
                generated = self.stored(t, new)  # every pair on disk under its final name
                self.check_engines(t, trained)  # they sampled with p_{t-1}, not stale weights
                model_dir, weights = self.export(t, trainer, engines)  # p_t as a HF checkpoint
                history.append(row.result())  # p_{t-1}'s row: evaluated before the swap, logged before p_t's
                step = self._record_training(t, trained, step)  # + DONE: the resume point
                synced = self.sync(t, sync, model_dir, weights)  # the engines serve p_t
                del weights  # every engine has it: the packed p_t (a whole model) is not kept through t + 1
                done = IterationDone(t, step, str(model_dir), generated, trained, synced, tick, trained_at)
                row = self.beside(self._iteration_row, done, evaluate)
            history.append(row.result())
            self.marks["done"] = time.time()
        except Exception as e:
            # A dead helper surfaces as whatever call hit it first: name the real cause.
            helpers = {"the engine pool": engines.pool}
            if trainer:
                helpers["the trainer's channel"] = trainer.channel
            if lost := dead(helpers):
                raise ActorLost(lost) from e
            raise
        finally:  # whatever happened, nothing keeps running (or holding GPUs) after the job
            self._shutdown(engines, trainer)
        return self._summary(history, engines, trainer)

    def beside(self, fn: Callable[..., dict[str, Any]], *args: Any) -> Future:
        """Runs `fn` (an evaluation) beside the next iteration's generation and training, or now
        (eval.beside false: where engines and trainer share CPU cores, each phase runs faster alone)."""
        if self.cfg.eval.beside:
            return self._beside.submit(fn, *args)
        done: Future = Future()
        done.set_result(fn(*args))
        return done

    def progress_since(self, cursor: int) -> list[dict[str, Any]]:
        """What the driver's console has not drawn yet (called while `run` works)."""
        return self.progress.read(cursor)

    def start(self, engines: Engines, model_path: str, holds: int) -> Trainer:
        """Returns once the engines are up: generation and the start model's evaluation need
        nothing else. The train ranks start meanwhile (on p_`holds`); the first training waits for them."""
        trainer = Trainer(self.cfg, model_path, holds)
        with self.progress.phase(0, "start-up", None, ""):
            engines.wait_ready()
        self.marks["engines_ready"] = time.time()
        self.stop_live = live_endpoint(self.cfg, engines, model_path, self.p.serve_key_digest, self.progress.say)
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
            "output_dir": str(self.run_dir.root.resolve()),
            "coordinator_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            # seconds from launch; trainer_ready: the last rank's; first_pair: on disk
            "startup_s": {k: v - self.marks["launch"] for k, v in self.marks.items() if k != "launch"},
        }
        write_atomic(self.run_dir.summary, json.dumps(summary, indent=2))
        self._report()  # now says "finished"
        return summary

    def generate(self, t: int, engines: Engines) -> Generation | None:
        """Every training prompt answered once by the engines (which hold p_{t-1}), written to
        disk batch by batch on a thread; None when there is nothing to generate. Without
        spin.stream, waits until every pair is stored."""
        pairs_dir = self.run_dir.pairs(t)
        if self.cfg.spin.objective == "sft" or pairs_dir.exists():  # the baseline trains on real answers only
            if pairs_dir.exists():
                self.progress.say(f"[{t}/{self.cfg.spin.iterations}] generate: reusing {pairs_dir}")
            self.generating.set()
            return None
        new = Generation(self._answers(t, engines), self.run_dir.pairs_tmp(t), self.p.train.records)
        new.on_first_part = lambda: (self.marks.setdefault("first_pair", time.time()), self.generating.set())
        if not self.cfg.spin.stream:
            new.wait()
        return new

    def _answers(self, t: int, engines: Engines) -> Iterator[pa.Table]:
        """Iteration t's prompts through the engines, as a phase of its own: it starts (on the
        Generation's thread) when first read."""
        g = self.cfg.generation
        with self.progress.phase(t, "generate", self.p.train.records, "prompts") as advance:
            prompts = write_prompts(self.p.train, self.cfg.run.seed, t, self.run_dir.prompts_tmp(t), g.batch_size)
            yield from answered(prompts, engines.generate, g, advance)

    def stored(self, t: int, new: Generation | None) -> Generated | None:
        """Waits until iteration t's pairs are all on disk and gives them their final name (only
        complete pair sets carry it)."""
        generated = new.wait() if new else None
        if new:
            new.tmp.rename(self.run_dir.pairs(t))
        shutil.rmtree(self.run_dir.prompts_tmp(t), ignore_errors=True)
        return generated

    def training_set(self, t: int, new: Generation | None, engines: Engines) -> PairStream:
        """The pairs p_t trains on: iteration t's and spin.mix_previous earlier iterations', in the
        stream spin_ray.pairs describes. The SFT baseline streams the same prompts in the same
        orders, with their real answers only."""
        s, seed = self.cfg.spin, self.cfg.run.seed
        iterations = range(max(1, t - s.mix_previous), t + 1)
        if s.objective == "sft":
            g, tmp = self.cfg.generation, self.run_dir.prompts_tmp(t)
            for i in iterations:
                write_prompts(self.p.train, seed, i, tmp / str(i), g.batch_size)
            sources = [tmp / str(i) for i in iterations]
        else:
            sources = [self.run_dir.pairs(i) for i in iterations if new is None or i < t]
        score = None
        if s.reference == "engines" and s.objective == "spin":  # log p_{t-1}, while the engines still hold p_{t-1}
            score = partial(_with_reference, engines=engines, batch_size=self.cfg.generation.batch_size)
        return pair_stream(sources, new, seed + t, s.shuffle_window, self.cfg.train.batch_size, score)

    def check_engines(self, t: int, trained: Trained) -> None:
        """Stops the run if the engines' log-probs of the tokens they sampled are not training's
        p_{t-1}'s: pairs from other weights than p_{t-1} would train p_t quietly wrong. The pairs
        are moved aside (kept to look at), so a rerun generates them again."""
        mean, worst = trained.logprob_mismatch or (0.0, 0.0)
        limit = self.cfg.sync.max_logprob_mismatch
        if mean <= limit:
            return
        rejected = self.run_dir.iteration(t) / "pairs.rejected"
        shutil.rmtree(rejected, ignore_errors=True)
        self.run_dir.pairs(t).rename(rejected)
        raise RuntimeError(
            f"iteration {t}: the engines sampled with other weights than p_{t - 1}: their log-probs of the generated "
            f"tokens differ from training's by {mean:.4f} per token on average (max {worst:.4f}), over "
            f"sync.max_logprob_mismatch={limit}. A weight sync went wrong; the pairs are in {rejected}, p_{t} was not "
            "saved. Rerun the same command to generate them again (raise sync.max_logprob_mismatch only if the engines "
            "run another dtype or kernels than training)."
        )

    def train(self, t: int, trainer: Trainer, pairs: PairStream) -> tuple[Trained, float]:
        """Returns what training reported and when it ended (perf_counter)."""
        with self.progress.phase(t, "train", None, "steps") as advance:
            trained = trainer.train(t, pairs, on_progress=advance)
        if "trainer_ready" not in self.marks:
            self.marks["trainer_ready"] = trainer.ready_at()
        return trained, time.perf_counter()

    def export(self, t: int, trainer: Trainer, engines: Engines) -> tuple[Path, ray.ObjectRef | None]:
        """A trainer group that restarts before p_t is on disk trains t again on the stored pairs."""
        model_dir = self.run_dir.model(t)
        again = partial(self.training_set, t, None, engines)
        lora = self.cfg.train.lora
        with self.progress.phase(t, "export", None, "checkpoint"):
            weights = trainer.export(t, model_dir, again, self.cfg.sync.method == "object_store")
            if lora and lora.export_merged:  # on CPU, in a task of its own (see merge)
                merged = model_dir.with_name("merged")
                ray.get(ray.remote(merge).options(num_cpus=1).remote(model_dir, merged, self.cfg.model.dtype))
            return model_dir, weights

    def sync(self, t: int, sync: WeightSync, model_dir: Path, weights: ray.ObjectRef | None) -> Synced:
        with self.progress.phase(t, "sync", self.cfg.generation.num_engines, "engines") as advance:
            synced = sync(t, model_dir, weights)
            advance(self.cfg.generation.num_engines)
        return synced

    def _record_training(self, t: int, trained: Trained, step: int) -> int:
        """Logs the training lines and marks iteration t trained; returns the new global step."""
        for line in trained.logs:
            metrics = {
                f"train/{k}": v for k, v in (line | distinct_only([line])).items() if k not in ("step", "iteration")
            }
            self.tracker.log({"iteration": t} | metrics, step=step + line["step"])
        step += trained.steps
        self.run_dir.mark_done(t, step)
        return step

    def _start_row(self, t: int, evaluate: Evaluator, model_dir: str, step: int) -> dict[str, Any]:
        # The engines take work in order: beside training, the first pairs (which it waits for) go first.
        if self.cfg.eval.beside:
            self.generating.wait()
        row = {"iteration": t} | ({"global_step": step} if t else {}) | evaluate(t, model_dir)
        self.marks["start_evaluated"] = time.time()
        # A resumed run logged p_t's row beside iteration t + 1, unless it stopped first: DONE(t) comes before.
        if not self.tracker.has_row(t):
            self.tracker.log(row, step=step)
        if t:  # its card, in case the run stopped before writing it
            self._card(t, row)
        return row

    def _iteration_row(self, done: IterationDone, evaluate: Evaluator) -> dict[str, Any]:
        """Evaluates p_t and logs iteration t's row (on the `beside` thread)."""
        evaluation = evaluate(done.t, done.model_dir)
        self.marks.setdefault("first_iteration", time.time())
        row = {
            "iteration": done.t,
            "global_step": done.global_step,
            **(done.generated.metrics() if done.generated else {}),
            **done.synced.metrics(),
            **done.trained.metrics(),
            "train/trainable_params": self.p.params[0],
            **evaluation,
            **self.progress.seconds.get(done.t, {}),
            "time/to_trained_s": done.trained_at - done.started,  # generation and training, overlapped or not
            "time/iteration_s": time.perf_counter() - done.started,
        }
        self.tracker.log(row, step=done.global_step)
        self._card(done.t, row)
        self.progress.say(iteration_line(row, self.cfg.spin.iterations))
        self._report()
        return row

    def _card(self, t: int, row: dict[str, Any]) -> None:
        """iter_t's model card, with the held-out metrics of p_0 ... p_t (`row`: p_t's)."""
        rows = read_metrics(self.run_dir.root) + [row]
        model = self.run_dir.model(t)
        for d in (model, model.with_name("merged")):
            if d.is_dir():
                text = card(self.cfg, self.p.model_path, t, rows, self.p.train.fingerprint, merged=d != model)
                write_atomic(d / "README.md", text)

    def _report(self) -> None:
        try:  # the report is for reading, never a reason to stop the run
            write_report(self.run_dir.root)
        except Exception as e:  # noqa: BLE001
            self.progress.say(f"[report] could not write {self.run_dir.report}: {e!r}")


def _with_reference(rows: Iterable[Row], engines: Engines, batch_size: int) -> Iterable[Row]:
    """`rows` with their reference log-probs (spin.reference=engines), scored a batch at a time."""
    score = partial(engines.score, columns=REFERENCE)
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, batch_size)):
        yield from run_batch(pa.Table.from_pylist(chunk), score).to_pylist()
