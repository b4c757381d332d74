"""DeepSpeed's side of a train rank: its config, the accumulation plan, the lr schedule, and the
CPU op built once."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from spin_ray.config import Config


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {
            "stage": t.zero_stage,
            # 0: partition every parameter, however small, so ZeRO-3 gathers are always exercised.
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


@dataclass(frozen=True)
class Micro:
    """Where one micro batch of an iteration goes."""

    step: int  # the iteration's optimizer step (0-based) its gradient is part of
    group: int  # the micro batches that step sums: grad_accum, or fewer for an epoch's last step
    last: bool  # that step's last micro batch: the optimizer steps after it (a DeepSpeed boundary)


def accumulation(per_epoch: int, epochs: int, grad_accum: int) -> list[Micro]:
    """One iteration's micro batches, grouped into optimizer steps as HF Trainer (and so TRL)
    groups them: grad_accum at a time, and an epoch's leftover as one smaller step at its end.
    Every iteration thus ends on an optimizer step: no gradient is left out of the exported p_t
    or carried into the next iteration (DeepSpeed's own count runs over the whole job)."""
    groups = [min(grad_accum, per_epoch - first) for first in range(0, per_epoch, grad_accum)] * epochs
    return [Micro(step, size, i == size - 1) for step, size in enumerate(groups) for i in range(size)]


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, schedule: str) -> float:
    """Linear warmup, then linear decay to 0 or constant, over one iteration's optimizer steps."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def build_cpu_ops() -> None:
    """Builds DeepSpeed's CPU all-reduce op once per machine (scripts/setup.sh calls this), so that
    no job pays for the build.

    torch builds such ops with the first `ninja` on PATH. Two ninja versions (the system's and this
    environment's) each take the other's build log for a stale one and rebuild the op: 30-140 s
    of both cores at a trainer's start, and a killed build leaves a lock that every later start
    waits on. So every process uses this environment's ninja, the pinned one.
    """
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()  # what deepspeed.initialize would do first (nothing off CPU)
