"""Figures of a SPIN run, shared by the run report (`spin_ray.report`) and `notebooks/spin_run.ipynb`.

Each `*_figure` function takes the tables `spin_ray.report.load_run` reads and returns a matplotlib Figure, or
None when the run has nothing to show for it yet. Figures are made without pyplot (no global state, no GUI backend) so
the job can build them after every iteration; matplotlib is imported only when a figure is made.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Panel title -> the series drawn in it; a panel whose series were never logged (an SFT arm logs no
# generated side) is left out.
TRAINING_PANELS = {
    "SPIN loss": ["train/loss"],
    "reward accuracy": ["train/rewards/accuracies", "train/rewards/accuracies_distinct"],
    "reward margin (real - generated)": ["train/rewards/margins", "train/rewards/margins_distinct"],
    "pairs with y' = y (no gradient)": ["train/pairs/identical"],
    "log-prob, summed over the response": ["train/logps/real", "train/logps/generated"],
    "response length, tokens": ["train/lengths/real", "train/lengths/generated"],
}
SERIES_LABELS = {
    "train/logps/real": "real y",
    "train/logps/generated": "generated y'",
    "train/lengths/real": "real y",
    "train/lengths/generated": "generated y'",
    "train/rewards/accuracies": "all pairs",
    "train/rewards/margins": "all pairs",
    "train/rewards/accuracies_distinct": "pairs with y' != y",
    "train/rewards/margins_distinct": "pairs with y' != y",
}
# The job logs each phase's wall time as `time/<phase>_s` (spin_ray.loop.progress.Progress), in this order.
ITERATION = "time/iteration_s"
PHASE_ORDER = ["time/generate_s", "time/reference_s", "time/train_s", "time/export_s", "time/sync_s", "time/eval_s"]


def trained_rows(iterations: pd.DataFrame) -> pd.DataFrame:
    """The rows of finished iterations; the start model's row has no global step."""
    if "global_step" not in iterations:
        return iterations.iloc[0:0]
    return iterations[iterations["global_step"].notna()]


def iteration_labels(iterations: pd.DataFrame) -> list[str]:
    """'start' for the start model's row, else the iteration number."""
    steps = _global_steps(iterations)
    return ["start" if pd.isna(g) else str(int(t)) for t, g in zip(iterations["iteration"], steps, strict=True)]


def _held_out_keys(iterations: pd.DataFrame) -> list[str]:
    return sorted(
        c
        for c in iterations.columns
        if c.startswith("eval/") and not c.endswith("/seconds") and iterations[c].notna().any()
    )


def training_figure(steps: pd.DataFrame, iterations: pd.DataFrame) -> Figure | None:
    """Each training metric per logged step (thin) and as its iteration mean (thick, across the iteration)."""
    rows = trained_rows(iterations)
    logged = [df for df in (steps, rows) if not df.empty]
    panels = {
        title: present
        for title, keys in TRAINING_PANELS.items()
        if (present := [k for k in keys if any(k in df and df[k].notna().any() for df in logged)])
    }
    if not panels:
        return None
    spans = _iteration_spans(steps, iterations)
    fig, axes = _grid(len(panels))
    for ax, (title, keys) in zip(axes, panels.items(), strict=True):
        for color, key in zip(("C0", "C1"), keys, strict=False):
            name = SERIES_LABELS.get(key, "")
            if key in steps:
                ax.plot(steps["step"], steps[key], color=color, lw=1, alpha=0.6, label=f"{name} per step".strip())
            if key in rows:
                means = [(spans[t], v) for t, v in zip(rows["iteration"], rows[key], strict=True) if pd.notna(v)]
                for i, ((lo, hi), v) in enumerate(means):
                    ax.hlines(v, lo, hi, color=color, lw=3, label=f"{name} iteration mean".strip() if i == 0 else None)
        for t, (lo, hi) in spans.items():
            ax.axvline(hi, color="0.6", ls=":", lw=1)
            ax.text((lo + hi) / 2, 1.0, f"iter {t}", transform=ax.get_xaxis_transform(), ha="center", va="bottom")
        ax.set_title(title, pad=14)
        ax.set_xlabel("training step")
        ax.legend(fontsize="small")
    return fig


def held_out_figure(iterations: pd.DataFrame) -> Figure | None:
    """Every `eval/*` metric per iteration; the start model p_0 is the first point when it was logged."""
    keys = _held_out_keys(iterations)
    if not keys:
        return None
    labels = iteration_labels(iterations)
    fig, axes = _grid(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        ax.plot(iterations["iteration"], iterations[key], marker="o")
        ax.set_xticks(iterations["iteration"], labels)
        ax.set_title(key)
        ax.set_xlabel("iteration (model p_t after it)")
    return fig


def pair_lengths_figure(lengths: dict[int, pd.DataFrame]) -> Figure | None:
    """Histograms of real vs generated response lengths in tokens, one panel per iteration, same bins."""
    if not lengths:
        return None
    both = sum(df["real"].add(df["generated"], fill_value=0) for df in lengths.values())
    used = both.index[both > 0]
    lo, hi = int(used.min()), int(used.max())
    # Whole-token bins while they stay readable; short toy answers would alias with fractional bins.
    bins = np.arange(lo, hi + 2) - 0.5 if hi - lo <= 60 else np.linspace(lo, hi, 41)
    fig, axes = _grid(len(lengths))
    for ax, (t, df) in zip(axes, sorted(lengths.items()), strict=True):
        ax.hist(df.index, bins=bins, weights=df["generated"], alpha=0.6, color="C1", label="generated y'")
        ax.hist(df.index, bins=bins, weights=df["real"], histtype="step", color="k", label="real y")
        ax.set_title(f"iteration {t}: {df['real'].sum()} pairs")
        ax.set_xlabel("response tokens")
        ax.legend(fontsize="small")
    return fig


def timing_figure(iterations: pd.DataFrame) -> Figure | None:
    """Seconds per phase of each iteration, stacked; 'other' is the iteration's time the phases do not cover."""
    seconds = phase_seconds(iterations)
    if seconds.empty:
        return None
    fig, (ax,) = _grid(1, width=max(4.0, 0.8 * len(seconds) + 2))
    bottom = np.zeros(len(seconds))
    labels = [str(t) for t in seconds.index]
    for phase in seconds.columns:
        ax.bar(labels, seconds[phase], bottom=bottom, label=phase.removeprefix("time/").removesuffix("_s"))
        bottom += seconds[phase].to_numpy()
    ax.set_xlabel("iteration")
    ax.set_ylabel("seconds")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
    return fig


def phase_seconds(iterations: pd.DataFrame) -> pd.DataFrame:
    """Finished iterations x phases (`time/<phase>_s` keys, plus 'other'), 0 where a phase did not run."""
    rows = trained_rows(iterations)
    if rows.empty:
        return pd.DataFrame()
    rows = rows.set_index("iteration")
    phases = [c for c in PHASE_ORDER if c in rows] + sorted(
        c for c in rows.columns if c.startswith("time/") and c.endswith("_s") and c not in [*PHASE_ORDER, ITERATION]
    )
    seconds = rows[phases].astype(float).fillna(0.0)
    if ITERATION in rows:
        other = (rows[ITERATION].astype(float) - seconds.sum(axis=1)).clip(lower=0).fillna(0.0)
        if (other > 0).any():
            seconds["other"] = other
    return seconds.loc[:, seconds.sum() > 0]


def _iteration_spans(steps: pd.DataFrame, iterations: pd.DataFrame) -> dict[int, tuple[float, float]]:
    """Iteration -> (first, last) training step it covers: it ends at its global step (or its last logged
    step while it runs) and begins where the iteration before it ended (or the start model's step)."""
    ends: dict[int, float] = {}
    if not steps.empty:
        ends |= steps.groupby("iteration")["step"].max().to_dict()
    rows = trained_rows(iterations)
    ends |= dict(zip(rows["iteration"], rows["global_step"], strict=True))
    start = iterations[_global_steps(iterations).isna()]
    previous = float(start["step"].min()) if "step" in start and start["step"].notna().any() else 0.0
    spans = {}
    for t in sorted(ends):
        spans[int(t)] = (previous, float(ends[t]))
        previous = float(ends[t])
    return spans


def _global_steps(iterations: pd.DataFrame) -> pd.Series:
    return iterations["global_step"] if "global_step" in iterations else pd.Series(np.nan, index=iterations.index)


def _grid(n: int, width: float = 4.2, height: float = 3.2, columns: int = 4) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    cols = min(n, columns)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]


def comparison_figure(summary: pd.DataFrame) -> Figure | None:
    """Each held-out metric per iteration: every arm's mean across seeds, shaded ± one std."""
    arms = summary[summary["group"] != "spin - sft"]
    metrics = sorted(arms["metric"].unique())
    if not metrics:
        return None
    fig, axes = _grid(len(metrics))
    for ax, metric in zip(axes, metrics, strict=False):
        for arm, rows in arms[arms["metric"] == metric].groupby("group"):
            rows = rows.sort_values("iteration")
            ax.plot(rows["iteration"], rows["mean"], marker="o", label=f"{arm} (n={rows['n'].max()})")
            ax.fill_between(rows["iteration"], rows["mean"] - rows["std"], rows["mean"] + rows["std"], alpha=0.2)
        ax.set_title(metric, fontsize="medium")
        ax.set_xlabel("iteration (0 = start model)")
        ax.legend(fontsize="small")
    return fig
