"""Is SPIN helping? Runs of one model and data set (either arm, any seeds) side by side.

Per iteration and held-out metric: each arm's mean and spread across seeds, and SPIN minus SFT,
paired by seed where both arms ran it. Runs whose model or data differ are refused: a difference
between them would say nothing about the objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from spin_ray.config import OPERATIONAL, flatten
from spin_ray.rundir import RunDir
from spin_ray.tracking import read_metrics

# The keys that make two runs' numbers comparable: the same model and the same data.
SAME = ("model.", "data.")


class ComparisonError(ValueError):
    """Runs that cannot be compared; the message names the keys and runs."""


@dataclass
class RunResult:
    path: Path
    arm: str  # spin.objective
    seed: int
    config: dict[str, Any]  # flat: "train.lr" -> value
    fingerprint: str | None
    rows: dict[int, dict[str, float]]  # iteration (0 = start model) -> its eval/* metrics


def load(path: str | Path) -> RunResult:
    path = Path(path)
    run = RunDir(path)
    try:
        config = flatten(yaml.safe_load(run.config.read_text()))
        lines = read_metrics(path)
    except (OSError, ValueError) as e:
        raise ComparisonError(f"{path}: not a spin-ray run directory ({e})") from None
    rows = {
        x["iteration"]: {k: v for k, v in x.items() if k.startswith("eval/")}
        for x in lines
        if "train/lr" not in x and any(k.startswith("eval/") for k in x)
    }
    fingerprint = run.fingerprint
    return RunResult(
        path,
        config.get("spin.objective", "spin"),
        int(config["run.seed"]),
        config,
        fingerprint.read_text().strip() if fingerprint.exists() else None,
        rows,
    )


def check_comparable(runs: list[RunResult], per_seed: bool = False) -> list[str]:
    """Raises naming every model/data key that differs; returns the other differing keys (a note).
    With `per_seed`, only runs of the same seed must share model and data (each seed may start
    from its own p_0, e.g. one SFT'd per seed); the comparison is then paired by seed."""
    refused, noted = [], set()
    for group in ([r for r in runs if r.seed == seed] for seed in {r.seed for r in runs}) if per_seed else [runs]:
        first = group[0]
        for run in group[1:]:
            for key in sorted(first.config.keys() | run.config.keys()):
                a, b = first.config.get(key), run.config.get(key)
                if a == b or key in ("spin.objective", "run.seed") or key.startswith(OPERATIONAL):
                    continue
                if key.startswith(SAME):
                    refused.append(f"  {key}: {a!r} ({first.path}) vs {b!r} ({run.path})")
                else:
                    noted.add(key)
            # The toy builds its data from run.seed; any other data set must be the same bytes.
            if first.config.get("model.path") != "toy" and first.fingerprint != run.fingerprint:
                refused.append(f"  training data content (data_fingerprint): {first.path} vs {run.path}")
    if refused:
        hint = "" if per_seed else "\n(--per-seed compares runs that share model and data within each seed)"
        raise ComparisonError(
            "these runs used different models or data, so their results do not compare:\n" + "\n".join(refused) + hint
        )
    return sorted(noted)


def summarize(runs: list[RunResult]) -> pd.DataFrame:
    """Long table: metric, iteration, group ('spin', 'sft', 'spin - sft'), mean, std, n."""
    records = [
        {"metric": m, "iteration": t, "arm": r.arm, "seed": r.seed, "value": v}
        for r in runs
        for t, row in r.rows.items()
        for m, v in row.items()
    ]
    if not records:
        raise ComparisonError("none of these runs has held-out metrics (eval/*) yet")
    values = pd.DataFrame(records)
    groups = [_stats(values.groupby(["metric", "iteration", "arm"])["value"]).rename(columns={"arm": "group"})]
    wide = values.pivot_table(index=["metric", "iteration", "seed"], columns="arm", values="value")
    if {"spin", "sft"} <= set(wide.columns):
        paired = (wide["spin"] - wide["sft"]).dropna().rename("value").reset_index()
        diff = _stats(paired.groupby(["metric", "iteration"])["value"])
        groups.append(diff.assign(group="spin - sft"))
    return pd.concat(groups, ignore_index=True)


def _cell(cells: pd.DataFrame, t: int, sign: str) -> str:
    return f"{cells.at[t, 'mean']:{sign}.4f}±{cells.at[t, 'std']:.4f}" if t in cells.index else "-"


def _stats(grouped: Any) -> pd.DataFrame:
    return grouped.agg(
        mean="mean", std=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, n="count"
    ).reset_index()


def format_table(summary: pd.DataFrame) -> str:
    """One block per metric: a row per arm (mean ± std over seeds) and SPIN - SFT, a column per iteration."""
    iterations = sorted(summary["iteration"].unique())
    head = f"{'':<30}" + "".join(f"{'start' if t == 0 else f'iter {t}':>16}" for t in iterations)
    blocks = []
    for metric, rows in summary.groupby("metric", sort=True):
        lines = [f"{metric:<30}" + head[30:]]
        for group in [g for g in ("spin", "sft", "spin - sft") if g in set(rows["group"])]:
            cells = rows[rows["group"] == group].set_index("iteration")
            n = int(cells["n"].max())
            label = f"  {group} ({n} seed{'s' * (n > 1)}{', paired' if group == 'spin - sft' else ''})"
            sign = "+" if group == "spin - sft" else ""
            lines.append(f"{label:<30}" + "".join(f"{_cell(cells, t, sign):>16}" for t in iterations))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
