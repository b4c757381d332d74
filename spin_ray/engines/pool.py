"""Engines that keep serving: liveness checks, deadlines, replacement, re-routed batches.

`EnginePool` (an async actor) owns the vLLM engine actors. It pings each one every few seconds
on a side thread of the engine (its own concurrency group, so a long `generate` does not delay
the answer); an engine that dies, or does not answer within `generation.health_timeout_s`
(frozen, node gone), is killed and replaced by a new actor wherever Ray can place it (the
autoscaler adds a node if needed), loaded with the weights the engines must serve at that moment.
Work is handed out batch by batch (`acquire`): callers never see the pool, only the `Engines`
handle (spin_ray.engines.client), which runs a batch whose engine died again elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from spin_ray.config import GenerationConfig
from spin_ray.engines.engine import launch_engine
from spin_ray.logs import name_log
from spin_ray.private import actor_id
from spin_ray.tracking import record_event


@dataclass
class Slot:
    handle: Any
    actor_id: str
    info: dict[str, Any] = field(default_factory=dict)  # pid, node
    in_flight: int = 0


class EngineLost(RuntimeError):
    """An engine was lost and generation.max_restarts replacements are used up (or one failed)."""


@ray.remote(num_cpus=0)
class EnginePool:
    def __init__(
        self, model_path: str, dtype: str, cfg: GenerationConfig, max_model_len: int, seed: int, output_dir: str
    ):
        name_log("engine-pool")
        self.cfg, self.dtype, self.max_model_len, self.seed = cfg, dtype, max_model_len, seed
        self.output_dir = output_dir
        self.weights = model_path  # what a replacement loads: p_0, then the latest exported p_t
        self.slots: list[Slot | None] = [None] * cfg.num_engines
        self.generation = 0  # goes up with every replacement: the weight-sync group must be rebuilt
        self.events: list[dict[str, Any]] = []
        self.pids: set[int] = set()
        self.fatal: str | None = None
        self.changed = asyncio.Condition()
        self.watcher: asyncio.Task | None = None
        self.replacing: set[asyncio.Task] = set()  # held: a dropped task's error would go unseen

    async def start(self) -> None:
        """Creates every engine and waits until all are up (the autoscaler may add nodes)."""
        await asyncio.gather(*(self._fill(i) for i in range(len(self.slots))))
        self._raise_if_fatal()
        self.watcher = asyncio.create_task(self._watch())

    async def _fill(self, i: int) -> None:
        """Starts engine i; one that dies while loading is started again (it counts as a restart)."""
        while self.fatal is None:
            handle = launch_engine(self.weights, self.dtype, self.cfg, self.max_model_len, self.seed + i)
            try:
                info = await asyncio.wait_for(handle.ready.remote(), timeout=self.cfg.start_timeout_s)
            except ray.exceptions.RayActorError as e:
                # An error raised by vLLM's own start-up (bad model, memory) would only repeat.
                if "creation task" in str(e) or len(self.events) >= self.cfg.max_restarts:
                    self.fatal = f"engine {i} failed to start: {e}"
                else:
                    self._record(i, f"died while starting: {type(e).__name__}", None, None, time.time(), 0.0)
                    continue
            except TimeoutError:
                c = self.cfg
                self.fatal = (
                    f"engine {i} not ready after {c.start_timeout_s:.0f} s. It asks for CPU={c.cpus_per_engine:g}, "
                    f"GPU={c.num_gpus * c.tensor_parallel_size}"
                    f"{', ' + c.resource + '=1' if c.resource else ''}; the cluster has "
                    f"{ray.cluster_resources()}. Fix generation.* (or raise generation.start_timeout_s while the "
                    "autoscaler adds nodes)"
                )
            else:
                self.slots[i] = Slot(handle, actor_id(handle), info)
                self.pids.add(info["pid"])
            break
        if self.slots[i] is None:
            ray.kill(handle, no_restart=True)
        async with self.changed:
            self.changed.notify_all()

    async def _watch(self) -> None:
        """Pings every engine; one that stays silent past the deadline is handled as lost."""
        interval = min(5.0, self.cfg.health_timeout_s / 4)
        while self.fatal is None:
            await asyncio.sleep(interval)
            live = [(i, s) for i, s in enumerate(self.slots) if s is not None]
            results = await asyncio.gather(
                *(asyncio.wait_for(s.handle.ping.remote(), timeout=self.cfg.health_timeout_s) for _, s in live),
                return_exceptions=True,
            )
            for (i, s), result in zip(live, results, strict=True):
                if isinstance(result, TimeoutError):
                    await self.lost(i, s.actor_id, f"no answer to a health ping within {self.cfg.health_timeout_s} s")
                elif isinstance(result, BaseException):
                    await self.lost(i, s.actor_id, f"health ping failed: {result!r}")

    async def lost(self, i: int, actor_id: str, cause: str) -> None:
        """Engine i (if it is still `actor_id`) is gone: kill what is left of it, start another."""
        slot = self.slots[i]
        if slot is None or slot.actor_id != actor_id:
            return  # already being replaced
        self.slots[i] = None
        ray.kill(slot.handle, no_restart=True)  # a frozen process must not come back half-updated
        if self.fatal is None and len(self.events) >= self.cfg.max_restarts:
            self.fatal = (
                f"engine {i} (pid {slot.info.get('pid')}, node {slot.info.get('node', '?')[:12]}) was lost: {cause}; "
                f"generation.max_restarts={self.cfg.max_restarts} replacements are used up. Check the engine's log "
                "(ray logs) and the nodes' health, or raise generation.max_restarts."
            )
        elif self.fatal is None:  # else shut down, or failed already: nothing to replace it for
            print(f"[health] engine {i} (pid {slot.info.get('pid')}) lost: {cause}; starting a replacement", flush=True)
            task = asyncio.create_task(self._replace(i, slot, cause, time.time()))
            self.replacing.add(task)
            task.add_done_callback(self.replacing.discard)
        async with self.changed:
            self.changed.notify_all()

    async def _replace(self, i: int, old: Slot, cause: str, lost_at: float) -> None:
        """A failure to start the replacement ends the job with its cause instead of leaving the
        slot empty and every caller waiting for it; one to record it is only said."""
        try:
            tick = time.perf_counter()
            await self._fill(i)
            self.generation += 1
        except Exception as e:  # noqa: BLE001 - made fatal: every waiter gets it
            self.fatal = self.fatal or f"replacing engine {i} (lost: {cause}) failed: {e!r}"
        try:  # the record is for reading: a full disk here must not stop the engines
            self._record(i, cause, old.info.get("pid"), self.slots[i], lost_at, time.perf_counter() - tick)
        except OSError as e:
            print(f"[health] could not record engine {i}'s replacement in events.jsonl: {e!r}", flush=True)
        async with self.changed:
            self.changed.notify_all()

    def _record(
        self, i: int, cause: str, old_pid: int | None, new: Slot | None, lost_at: float, recovery_s: float
    ) -> None:
        """One engine replacement, kept for stats() and appended to events.jsonl."""
        event = {
            "engine": i,
            "cause": cause,
            "old_pid": old_pid,
            "new_pid": new.info.get("pid") if new else None,
            "new_node": new.info.get("node") if new else None,
            "lost_at": lost_at,
            "recovery_s": recovery_s,
        }
        self.events.append(event)
        record_event(self.output_dir, "engine_replaced", **event)

    def _raise_if_fatal(self) -> None:
        if self.fatal:
            raise EngineLost(self.fatal)

    async def acquire(self) -> tuple[int, str, Any]:
        """The least-loaded live engine (waits while engines are being replaced)."""
        async with self.changed:
            while True:
                self._raise_if_fatal()
                live = [(s.in_flight, i) for i, s in enumerate(self.slots) if s is not None]
                if live:
                    _, i = min(live)
                    slot = self.slots[i]
                    slot.in_flight += 1
                    return i, slot.actor_id, slot.handle
                await self.changed.wait()

    async def release(self, i: int, actor_id: str) -> None:
        slot = self.slots[i]
        if slot is not None and slot.actor_id == actor_id:
            slot.in_flight -= 1

    async def engines(self) -> list[Any]:
        """Every engine, once none is being replaced."""
        async with self.changed:
            while not all(self.slots):
                self._raise_if_fatal()
                await self.changed.wait()
        self._raise_if_fatal()
        return [s.handle for s in self.slots]

    async def set_weights(self, path: str) -> None:
        self.weights = path

    async def reload(self) -> None:
        """After a failed sync: every live engine reloads self.weights from disk (none keeps half
        an update); one that fails is replaced, and its replacement loads them anyway."""
        slots = [(i, s) for i, s in enumerate(self.slots) if s is not None]
        results = await asyncio.gather(
            *(s.handle.load_checkpoint.remote(self.weights) for _, s in slots), return_exceptions=True
        )
        for (i, s), result in zip(slots, results, strict=True):
            if isinstance(result, BaseException):
                await self.lost(i, s.actor_id, f"reload after a failed sync failed: {result!r}")
        await self.engines()

    async def stats(self) -> dict[str, Any]:
        return {
            "engine_starts": len(self.pids),
            "engine_replacements": self.events,
            "engines": [s.info for s in self.slots if s],
            "generation": self.generation,
        }

    async def shutdown(self) -> None:
        # A live request that meets an engine being stopped must not start a replacement.
        self.fatal = "the engines were shut down: the job is ending"
        async with self.changed:
            self.changed.notify_all()  # waiters for an engine get that error
        if self.watcher:
            self.watcher.cancel()
        live = [s.handle for s in self.slots if s is not None]
        try:  # a frozen engine must not hold the job's end
            await asyncio.wait_for(asyncio.gather(*(h.shutdown.remote() for h in live), return_exceptions=True), 30)
        except TimeoutError:
            pass
        for h in live:
            ray.kill(h, no_restart=True)
