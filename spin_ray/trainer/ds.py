"""DeepSpeed's side of a train rank: its config, the lr schedule, and the CPU op built once."""

from __future__ import annotations

import math
import os
import sys
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
