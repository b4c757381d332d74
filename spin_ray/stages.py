"""What one stage of an iteration hands the next: typed, so a misspelt key fails where it is read.

`Prepared` is the driver's checked input to the coordinator; `Generated`, `Trained` and `Synced`
are what generation, training and the weight sync report, each turned into its metrics by
`metrics()` for the iteration's row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spin_ray.data import Example, TrainingSet


@dataclass
class Prepared:
    """What a run needs, checked in the driver before Ray, engines or trainers start."""

    model_path: str
    train: TrainingSet  # on disk, under run.output_dir/data
    eval: list[Example]  # held out: small, and read every iteration
    toy: bool
    max_model_len: int
    serve_key_digest: str | None = None  # serve.live's bearer key, hashed: the key stays in the driver
    inputs: dict[str, str] = field(default_factory=dict)  # fingerprints of the start model and eval data
    params: tuple[int, int] = (0, 0)  # (trainable, all) parameters: with train.lora, the adapter's are trainable
    limits: list[str] = field(default_factory=list)  # the token limits taken from the data, and why


@dataclass(frozen=True)
class Generated:
    seconds: float
    tokens: int

    def metrics(self) -> dict[str, float]:
        return {"gen/seconds": self.seconds, "gen/tokens_per_s": self.tokens / max(self.seconds, 1e-9)}


@dataclass(frozen=True)
class Trained:
    logs: list[dict[str, float]]  # a line per train.log_every micro batches, rank-averaged
    seconds: float
    steps: int  # micro batches
    pid: int  # of the rank that reported it
    # (mean, max) per-token |log p_engine - log p_{t-1}| of the generated tokens; None: none compared
    logprob_mismatch: tuple[float, float] | None = None

    def metrics(self) -> dict[str, float]:
        keys = [k for k in (self.logs[0] if self.logs else {}) if "/" in k or k == "loss"]
        weights = [line.get("pairs", 1.0) for line in self.logs]
        means = {f"train/{k}": float(np.average([line[k] for line in self.logs], weights=weights)) for k in keys}
        means |= {f"train/{k}": v for k, v in distinct_only(self.logs).items()}
        if self.logprob_mismatch:
            means |= dict(zip(("gen/logprob_mismatch", "gen/logprob_mismatch_max"), self.logprob_mismatch, strict=True))
        return means | {"train/seconds": self.seconds}


def distinct_only(means: list[dict[str, float]]) -> dict[str, float]:
    """spin_ray.loss.spin_metrics's `*_distinct` figures of batches (of `pairs` pairs each) as
    means over their distinct pairs only (y' != y); NaN when every pair was identical. {} for the
    SFT arm."""
    if not means or "pairs/identical" not in means[0]:
        return {}
    weights = np.array([m.get("pairs", 1.0) for m in means])
    distinct = weights @ [1 - m["pairs/identical"] for m in means]
    keys = [k for k in means[0] if k.endswith("_distinct")]
    return {k: float(weights @ [m[k] for m in means] / distinct) if distinct > 1e-9 else float("nan") for k in keys}


@dataclass(frozen=True)
class Synced:
    seconds: float
    bytes: int | None = None  # per engine; None when the sync failed and the engines reloaded from disk

    def metrics(self) -> dict[str, float]:
        if self.bytes is None:
            return {"sync/seconds": self.seconds, "sync/recovered": 1.0}
        return {"sync/seconds": self.seconds, "sync/bytes": self.bytes}


@dataclass(frozen=True)
class IterationDone:
    """Iteration t trained, exported and synced: what its row in metrics.jsonl is made of."""

    t: int
    global_step: int
    model_dir: str
    generated: Generated | None  # None when its pairs were stored already (or the SFT arm)
    trained: Trained
    synced: Synced
    started: float  # perf_counter at the iteration's start
    trained_at: float  # perf_counter when its training ended
