"""The handle everyone else holds on the engines: "run this batch", "answer this live request".

`Engines` wraps the pool actor and is small enough to travel: the coordinator, Ray Data's tasks
and the live gateway each hold a copy. Which engine runs a batch, and running it again elsewhere
when that engine is lost meanwhile (same rows, same per-row seeds: exactly one result per prompt),
is decided in `_call`, the one retry rule. `through_engines` streams a table or batch files through
them with Ray Data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from spin_ray.cluster import on_this_node
from spin_ray.config import Config, GenerationConfig
from spin_ray.engines.pool import EnginePool

Rows = dict[str, list]
Batch = Callable[[Rows], Rows]  # an engine operation on one batch: engines.generate, partial(engines.score, ...)


class EngineUnavailable(RuntimeError):
    """A live request's engine was lost; the request is not run again."""


class Engines:
    def __init__(self, cfg: Config, model_path: str, max_model_len: int):
        # On the driver's node (the head): the pool needs no GPU node to exist, and a 0-CPU actor
        # on a worker node would not stop the autoscaler from removing that node.
        self.pool = EnginePool.options(scheduling_strategy=on_this_node()).remote(
            model_path, cfg.model.dtype, cfg.generation, max_model_len, cfg.run.seed, cfg.run.output_dir
        )
        self.started = self.pool.start.remote()  # engines load while the trainer starts
        self.g = cfg.generation

    async def _call(self, work: Callable[[Any], ray.ObjectRef], what: str, again: bool = True) -> Any:
        """`work(engine)` on the least-loaded live engine. If that engine is lost meanwhile (its
        process, or vLLM's engine core inside it, died; or it is past generation.batch_timeout_s),
        the pool replaces it and the work runs again on another (`again`), or EngineUnavailable."""
        while True:
            i, actor_id, engine = await self.pool.acquire.remote()
            try:
                return await asyncio.wait_for(work(engine), timeout=self.g.batch_timeout_s)
            except ray.exceptions.RayActorError as e:
                cause = f"{what} failed: {type(e).__name__}"
            except TimeoutError:
                cause = f"{what} not done within generation.batch_timeout_s={self.g.batch_timeout_s:g} s"
            except ray.exceptions.RayTaskError as e:
                if await self._healthy(engine):
                    raise  # the work's own error (bad input): it would fail anywhere
                cause = f"{what} failed and the engine's vLLM is dead: {type(e).__name__}"
            finally:
                self.pool.release.remote(i, actor_id)
            await self.pool.lost.remote(i, actor_id, cause)
            if not again:
                raise EngineUnavailable(cause)

    async def _healthy(self, engine: Any) -> bool:
        try:
            return await asyncio.wait_for(engine.ping.remote(), timeout=self.g.health_timeout_s)
        except Exception:  # noqa: BLE001 - dead, frozen or vLLM's engine core gone
            return False

    def generate(self, rows: Rows, greedy: bool = False, **limits: Any) -> Rows:
        """One sampled (or greedy) response per row of `prompt_ids`, seeded per row by `seed`;
        `limits`: Engine.generate's max_tokens and stop."""
        return asyncio.run(self._call(lambda e: e.generate.remote(rows, greedy, **limits), "generate"))

    def score(self, rows: Rows, columns: dict[str, str], greedy: bool = False) -> Rows:
        """Summed log p(response | prompt) of each response column: {response column: output
        column}; with `greedy`, also whether each response is the greedy one."""
        return asyncio.run(self._call(lambda e: e.score_batch.remote(rows, columns, greedy), "score"))

    async def complete(self, prompt_ids: list[int], params: dict[str, Any]) -> dict[str, Any]:
        """One live request (serve.live), between the SPIN batches."""
        return await self._call(lambda e: e.complete.remote(prompt_ids, params), "live request", again=False)

    def wait_ready(self) -> None:
        ray.get(self.started)

    def all(self) -> list[Any]:
        """Every engine actor, once none is being replaced (for a weight sync)."""
        return ray.get(self.pool.engines.remote())

    def set_weights(self, path: str) -> None:
        """The checkpoint a replacement engine loads from now on."""
        ray.get(self.pool.set_weights.remote(path))

    def reload(self) -> None:
        """Every engine reloads the current checkpoint from disk (after a failed sync)."""
        ray.get(self.pool.reload.remote())

    def stats(self) -> dict[str, Any]:
        return ray.get(self.pool.stats.remote())

    def shutdown(self) -> None:
        ray.get(self.pool.shutdown.remote())


def run_batch(batch: pa.Table, op: Batch) -> pa.Table:
    """`batch` plus the columns `op` returns for it."""
    for name, values in op(batch.to_pydict()).items():  # plain Arrow lists: list<int64> ids stay lists in Parquet
        batch = batch.append_column(name, pa.array(values))
    return batch


def _run_block(block: pa.Table, op: Batch) -> pa.Table:
    """through_engines' Ray Data task: a block is a batch, or the path of a file holding one."""
    if block.column_names == ["path"]:
        block = pq.read_table(block["path"][0].as_py())
    return run_batch(block, op)


def _unchanged(batch: pa.Table) -> pa.Table:
    return batch


def warm_up(cfg: GenerationConfig) -> None:
    """Starts Ray Data's task workers (and their import of this module) while the engines load:
    a job's first pipeline would otherwise wait seconds for them."""
    ds = ray.data.from_items([{"x": i} for i in range(cfg.num_engines * cfg.max_in_flight)])
    pool = ray.data.TaskPoolStrategy(size=cfg.num_engines * cfg.max_in_flight)
    ds.map_batches(_unchanged, batch_size=1, batch_format="pyarrow", compute=pool, num_cpus=0.01).materialize()


def through_engines(rows: pa.Table | list[Path], op: Batch, cfg: GenerationConfig) -> ray.data.Dataset:
    """A lazy Dataset of `rows` (a table, or parquet files of one batch each, read by Ray Data's
    tasks: the caller never holds them) plus the columns `op` adds: exactly one row out per row
    in, whatever the order or the engines lost.

    Batches are fixed by row position and come out in that order (so results do not depend on
    timing); Ray Data keeps cfg.max_in_flight batches per engine in flight, and the pool gives
    each to the least-loaded engine.
    """
    # One block of exactly one batch per task: with a single block every batch would go through
    # one task in turn (the engines would take turns), and Ray Data's own parquet reader makes a
    # single block of many small files.
    size = cfg.batch_size
    if isinstance(rows, pa.Table):
        blocks = [rows.slice(i, size) for i in range(0, max(rows.num_rows, 1), size)]
    else:
        blocks = [pa.table({"path": [str(path)]}) for path in rows]
    ds = ray.data.from_arrow(blocks).map_batches(
        _run_block,
        fn_kwargs={"op": op},
        batch_size=None,  # a block is a batch
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=cfg.num_engines * cfg.max_in_flight),
        num_cpus=0.01,  # the task only waits on an engine: don't let it hold a core
    )
    ds.context.execution_options.preserve_order = True  # a finished batch waits for those before it
    return ds
