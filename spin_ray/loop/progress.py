"""The coordinator's account of what it is doing, which the driver's console polls and draws
(spin_ray.driver.console), and the per-iteration line and table both print."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


class Progress:
    """The coordinator's account of what it is doing; `read` hands the driver what is new.

    Lines also go to stdout, which is the coordinator's log file, so the logs hold them too."""

    def __init__(self, iterations: int):
        self.iterations = iterations
        self._events: list[dict[str, Any]] = []
        self._dropped = 0  # events before _events[0], already read: a 20-iteration job keeps no history
        self._lock = threading.Lock()
        self.seconds: dict[int, dict[str, float]] = {}  # iteration -> {"time/<phase>_s": wall seconds}

    def _add(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._events.append({"time": time.time()} | event)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self._add({"kind": "line", "text": text})

    @contextlib.contextmanager
    def phase(self, t: int, name: str, total: int | None, unit: str) -> Iterator[Callable[..., None]]:
        """One phase of iteration t (0 = the start model); yields `advance(done, total=None)`.
        Phases may overlap (generation, training and evaluation run side by side). An evaluation
        is labelled by the model it scores, p_t: it runs beside iteration t + 1."""
        label = f"[p_{t}] {name}" if name in ("eval", "lm-eval") else f"[{t}/{self.iterations}] {name}"
        self._add({"kind": "phase", "label": label, "total": total, "unit": unit})
        state = {"done": 0, "total": total}
        tick = time.perf_counter()

        def advance(done: int, total: int | None = None) -> None:
            state["done"], state["total"] = done, total or state["total"]
            self._add({"kind": "advance", "label": label, "done": done, "total": state["total"]})

        try:
            yield advance
        finally:
            self._add({"kind": "end", "label": label, "done": state["done"], "total": state["total"]})
            self.seconds.setdefault(t, {})[f"time/{name}_s"] = time.perf_counter() - tick

    def read(self, since: int) -> list[dict[str, Any]]:
        """Events from number `since` on; the reader's cursor says what it has, so those are dropped."""
        with self._lock:
            del self._events[: max(0, since - self._dropped)]
            self._dropped = max(self._dropped, since)
            return list(self._events)


TABLE = {  # column -> metrics key, for the per-iteration line and the final table
    "loss": "train/loss",
    "reward_acc": "train/rewards/accuracies",
    "margin": "train/rewards/margins",
    "identical": "train/pairs/identical",  # y' = y: no gradient, and no reward accuracy to speak of
    "acc_distinct": "train/rewards/accuracies_distinct",
    "eval_logp": "eval/logps/real",
    "eval_acc": "eval/accuracy",
    "seconds": "time/iteration_s",
}


def iteration_line(row: dict[str, Any], iterations: int) -> str:
    cells = [f"{name} {row[key]:.4f}" for name, key in TABLE.items() if key in row and name != "seconds"]
    if "sync/bytes" in row:  # a LoRA run's adapter, or the whole model
        cells.append(f"synced {row['sync/bytes'] / 2**20:.3g} MiB per engine")
    return f"[{row['iteration']}/{iterations}] done in {duration(row['time/iteration_s'])}: " + "  ".join(cells)


def table(history: list[dict[str, Any]]) -> str:
    """One row per iteration; the first row is the model the run started from (p_0, or the
    resumed model)."""
    lines = [f"{'iter':>6}" + "".join(f"{name:>13}" for name in TABLE)]
    for row in history:
        label = "start" if row is history[0] else str(row["iteration"])
        lines.append(f"{label:>6}" + "".join(f"{row[k]:>13.4f}" if k in row else f"{'-':>13}" for k in TABLE.values()))
    return "\n".join(lines)


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
