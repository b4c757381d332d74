"""The hot-swap: the trainer's new weights into every running engine, whatever fails meanwhile.

Both paths (spin_ray.weights) are all-or-nothing: if any part of a sync fails, every engine
reloads the just-exported checkpoint from disk, so none keeps half an update. The broadcast
group is rebuilt whenever an engine or the trainer group was replaced since it was made.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray

from spin_ray.config import Config
from spin_ray.engines.client import Engines
from spin_ray.stages import Synced
from spin_ray.trainer.supervisor import Trainer
from spin_ray.weights import Spec, plan_buckets


class WeightSyncError(RuntimeError):
    """A sync failed midway; some engines may hold half-updated weights until they reload."""


class WeightSync:
    def __init__(self, cfg: Config, engines: Engines, trainer: Trainer):
        self.cfg, self.engines, self.trainer = cfg, engines, trainer
        self.connected: tuple[int, int] | None = None  # (pool, trainer) generations of the group
        self.plan: list[list[Spec]] = []

    def __call__(self, t: int, model_dir: Path, weights: ray.ObjectRef | None) -> Synced:
        """Returns once every engine serves p_t, whose checkpoint is `model_dir`."""
        tick = time.perf_counter()
        self.engines.set_weights(str(model_dir))  # replacements from now on load these
        try:
            nbytes = self._push(t, str(model_dir), weights)
        except WeightSyncError as e:
            print(f"[health] {e}; every engine reloads {model_dir} from disk", flush=True)
            self.connected = None
            self.engines.reload()
            return Synced(time.perf_counter() - tick)
        return Synced(time.perf_counter() - tick, nbytes)

    def _push(self, t: int, serving: str, weights: ray.ObjectRef | None) -> int:
        """Bytes each engine received; raises WeightSyncError if any part fails."""
        method = self.cfg.sync.method
        try:
            engines = self.engines.all()
            if method == "object_store":
                reports = ray.get([e.load_weights.remote(weights, serving) for e in engines])
            else:
                self._connect(engines)
                received = [e.receive_weights.remote(self.plan, self.trainer.world_size, serving) for e in engines]
                self.trainer.broadcast_weights(t, self.plan)
                reports = ray.get(received)
        except Exception as e:  # noqa: BLE001 - whatever broke, the caller makes every engine reload
            raise WeightSyncError(f"weight sync ({method}) failed midway: {e!r}") from e
        return reports[0]["bytes"]

    def _connect(self, engines: list) -> None:
        """Every trainer rank and every engine worker join a new weight-sync group, on a fresh
        port, when an engine or the trainer group was replaced since the last one."""
        now = (self.engines.stats()["generation"], self.trainer.generation)
        if now == self.connected:
            return
        tp, timeout = self.cfg.generation.tensor_parallel_size, self.cfg.sync.timeout_s
        senders = self.trainer.world_size
        world_size = senders + len(engines) * tp
        master, port = self.trainer.weight_address()
        joined = [
            e.join_weight_group.remote(master, port, senders + i * tp, world_size, timeout)
            for i, e in enumerate(engines)
        ]
        self.trainer.join_weight_group(master, port, world_size, timeout)
        ray.get(joined, timeout=timeout)
        if not self.plan:
            self.plan = plan_buckets(self.trainer.wait_ready(), int(self.cfg.sync.bucket_mb * 2**20))
        self.connected = now
