"""The coordinator's handle on the train ranks: starts them once, runs their methods, survives restarts.

One `TorchTrainer.fit()` per job, not per iteration (a fit costs ~36 s of start-up on CPU against
seconds of training). Each public method of `Trainer` runs the `SpinWorker` method of the same
name on every rank through the channel; a group that Ray Train restarts meanwhile gets the task
again (or, for a stream, the stream again from its first step). A restarted group loads the
latest checkpoint, so one that restarts after training but before p_t is on disk holds p_{t-1}
again: `export` then trains the iteration again before it writes anything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from spin_ray.cluster import on_this_node
from spin_ray.config import Config
from spin_ray.pairs import PairStream
from spin_ray.stages import Trained
from spin_ray.tracking import record_event
from spin_ray.trainer.channel import Channel, Failure, State, Task
from spin_ray.trainer.feeder import Feeder
from spin_ray.trainer.worker import SpinWorker, worker_loop
from spin_ray.weights import Spec


class TrainerError(RuntimeError):
    """The trainer failed, stalled or ran out of restarts; the message says which and what to do."""


class GroupRestarted(Exception):
    """The worker group restarted during a task that cannot simply be posted again."""


class Trainer:
    def __init__(self, cfg: Config, model_path: str, iteration: int = 0):
        """Starts the ranks on `model_path`, which is p_`iteration` (0: the base model)."""
        self.cfg = cfg
        # On this node (the head): a 0-CPU actor elsewhere would not keep its node busy, and the
        # autoscaler would remove the node from under it.
        self.channel = Channel.options(scheduling_strategy=on_this_node()).remote(
            cfg.train.num_workers, model_path, iteration
        )
        self.generation = 0  # worker groups seen; goes up on every restart
        self.restarts: list[dict[str, Any]] = []
        self.pids: list[int] = []
        self.nodes: list[str] = []
        self._task_id = 0
        self._error: BaseException | None = None
        self._stopping = False
        self._specs: list[Spec] | None = None
        self._thread = threading.Thread(target=self._fit, daemon=True)
        self._thread.start()  # returns at once: the workers start while engines load and generate

    @property
    def world_size(self) -> int:
        return self.cfg.train.num_workers

    def wait_ready(self, check: Callable[[], None] = lambda: None) -> list[Spec]:
        """Waits until every rank is up (or `check` raises); returns (name, shape, dtype) of every weight."""
        if self._specs is None:
            self._specs = self._call(SpinWorker.weight_specs, check=check)[0]
        return self._specs

    def ready_at(self) -> float:
        """When the last rank was up (epoch seconds), for the start-up breakdown."""
        return ray.get(self.channel.ready_at.remote())

    def train(
        self, iteration: int, pairs: PairStream, on_progress: Callable[[int, int], None] | None = None
    ) -> Trained:
        """One SPIN iteration of training on `pairs`, fed to the ranks step by step as they come
        (equal rows per rank, so equal steps). A group that restarts gets the stream again from
        its first step: its order is replayable (spin_ray.pairs)."""
        self.wait_ready(pairs.check)  # the steps are fed to one known group; failed generation ends the wait
        rows_per_rank = pairs.total // self.world_size
        while True:
            feeder = Feeder(self.channel, self.generation, pairs.steps(self.world_size, self.cfg.train.epochs))
            try:
                return self._call(
                    SpinWorker.train,
                    on_progress,
                    feeder.check,
                    again=False,
                    iteration=iteration,
                    rows_per_rank=rows_per_rank,
                )[0]
            except GroupRestarted:
                continue
            finally:
                feeder.stop()

    def export(
        self, iteration: int, model_dir: Path, pairs_again: Callable[[], PairStream], pack_weights: bool = True
    ) -> ray.ObjectRef | None:
        """Writes p_t (t = `iteration`, just trained) as a HF checkpoint; returns the object-store
        ref of its packed weights. A group that restarted since training holds p_t if the
        checkpoint was complete (it exports again), else p_{t-1}: it trains iteration t again on
        `pairs_again()` first."""
        while True:
            try:
                kwargs = {"iteration": iteration, "model_dir": str(model_dir), "pack_weights": pack_weights}
                return self._call(SpinWorker.export, again=False, **kwargs)[0]
            except GroupRestarted:
                if ray.get(self.channel.holds.remote()) < iteration:
                    print(
                        f"[train] the new group holds p_{iteration - 1}: training iteration {iteration} again",
                        flush=True,
                    )
                    self.train(iteration, pairs_again())

    def weight_address(self) -> tuple[str, int]:
        return self._call(SpinWorker.weight_address)[0]

    def join_weight_group(self, master: str, port: int, world_size: int, timeout_s: float) -> None:
        self._call(SpinWorker.join_weight_group, master=master, port=port, world_size=world_size, timeout_s=timeout_s)

    def broadcast_weights(self, iteration: int, plan: list[list[Spec]]) -> None:
        self._call(SpinWorker.broadcast_weights, iteration=iteration, plan=plan)

    def stop(self) -> None:
        self._stopping = True
        self._task_id += 1
        self._post([Task(self._task_id, None)] * self.world_size)
        self._thread.join(timeout=120)

    def _torch_trainer(self, attempt: int, max_failures: int) -> Any:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        t = self.cfg.train
        resources = {"CPU": t.num_cpus} | ({t.resource: 1} if t.resource else {}) | ({"GPU": 1} if t.use_gpu else {})
        return TorchTrainer(
            worker_loop,
            train_loop_config={"cfg": self.cfg, "channel": self.channel},
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=f"spin-train-{attempt}",
                storage_path=str(Path(self.cfg.run.output_dir).resolve() / "ray_train"),
                failure_config=FailureConfig(max_failures=max_failures),
            ),
        )

    def _fit(self) -> None:
        """Runs Ray Train until the workers are told to stop. Ray Train restarts the worker group
        itself when a worker process dies; a lost node can instead surface as a controller error
        it does not retry ("actor unavailable"), and then a new run starts here. Both draw on one
        budget of train.max_restarts new groups. Its workers say hello and get the interrupted task again."""
        failed_runs = 0
        while True:
            restarted = max(0, ray.get(self.channel.groups.remote()) - 1)  # groups after the first, in any run
            left = self.cfg.train.max_restarts - restarted - failed_runs
            if left < 0:
                return
            try:
                self._torch_trainer(failed_runs, left).fit()
                return
            except BaseException as e:  # noqa: BLE001 - surfaced to the coordinator in _call()
                self._error = e
                if self._stopping:
                    return
                failed_runs += 1
                print(f"[train] Ray Train stopped ({type(e).__name__}); starting a new run", flush=True)

    def _call(
        self,
        method: Callable[..., Any],
        on_progress: Callable[[int, int], None] | None = None,
        check: Callable[[], None] = lambda: None,
        again: bool = True,
        **kwargs: Any,
    ) -> list[Any]:
        """Runs `method` (a SpinWorker method) with `kwargs` on every rank and returns every rank's
        result; `on_progress(done, total)` hears rank 0's optimizer steps, `check()` runs at every
        poll (its error ends the wait). A group that restarts meanwhile gets the task again, or
        (`again=False`) GroupRestarted is raised."""
        name = method.__name__
        posted = time.time()
        self._post_new(method, kwargs)
        while True:
            state: State = ray.get(self.channel.poll.remote(self._task_id))
            if state.generation > self.generation:
                if self.generation:
                    restart = {"during": name, "pids": self.pids, "recovery_s": time.time() - posted}
                    self.restarts.append(restart)
                    record_event(self.cfg.run.output_dir, "trainer_restarted", **restart)
                    print(f"[train] worker group restarted during {name}; running it again", flush=True)
                restarted = bool(self.generation)
                self.generation = state.generation
                self.pids = [w["pid"] for w in state.workers]
                self.nodes = [w["node"] for w in state.workers]
                if restarted and not again:
                    raise GroupRestarted(name)
                self._post_new(method, kwargs)
                posted = state.now
                continue
            check()
            if on_progress and 0 in state.steps:
                on_progress(*state.steps[0])
            if state.results is not None:
                failures = [r for r in state.results if isinstance(r, Failure)]
                if failures:
                    raise TrainerError(failures[0].message)
                return state.results
            if not self._thread.is_alive():
                raise TrainerError(
                    f"training workers stopped after {len(self.restarts)} restart(s) "
                    f"(train.max_restarts={self.cfg.train.max_restarts}): {self._error!r}"
                ) from self._error
            self._check_stall(name, state, posted)
            time.sleep(0.2)

    def _post_new(self, method: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        self._task_id += 1
        self._post([Task(self._task_id, method, kwargs)] * self.world_size)

    def _post(self, tasks: list[Task]) -> None:
        # Posted only to the group the coordinator knows; a newer one gets it after the poll sees it.
        ray.get(self.channel.post.remote(tasks, self.generation))

    def _check_stall(self, name: str, state: State, posted: float) -> None:
        """No silent hangs: ranks that show no progress for too long are reported with what each
        was last doing (starting up gets the longer start-up deadline)."""
        c = self.cfg.train
        stalled = []
        for rank in range(self.world_size):
            when, what = state.beats.get(rank, (posted, "waiting to be scheduled"))
            limit = c.start_timeout_s if what in ("starting", "waiting to be scheduled") else c.stall_timeout_s
            quiet = state.now - max(when, posted)
            if quiet > limit:
                pid = (state.workers[rank] or {}).get("pid")
                stalled.append(f"rank {rank} (pid {pid}) silent for {quiet:.0f} s, last: {what!r}")
        if stalled:
            raise TrainerError(
                f"the trainer stalled while running {name!r}: " + "; ".join(stalled) + ". A frozen worker or a hung "
                f"collective (the other ranks wait for it), or missing resources ({ray.available_resources()} free). "
                "Check that rank's log and node; raise train.stall_timeout_s (train.start_timeout_s for start-up) "
                "if a step is legitimately this slow."
            )
