"""Held-out metrics any user can read, and user hooks that add their own.

The engines produce three passes over the held-out prompts (a fresh sample y' per prompt, both
answers scored, a greedy answer); the functions here turn them into numbers. A hook is
`pkg.module:function(checkpoint_dir, iteration) -> dict`, checked at start and isolated at run
time: a failing hook is reported and the run goes on.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

Hook = Callable[[str, int], dict[str, float]]


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of the generations (Li et al. 2016): low means repetitive."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def answer_metrics(
    real_logps: np.ndarray,
    sampled_logps: np.ndarray,
    real_ids: Sequence[Sequence[int]],
    sampled_ids: Sequence[Sequence[int]],
    greedy: Sequence[str],
    real: Sequence[str],
) -> dict[str, float]:
    """Per-prompt arrays in the same order -> the held-out metrics of one model."""
    return {
        "eval/logps/real": float(np.mean(real_logps)),
        "eval/logps/generated": float(np.mean(sampled_logps)),
        # SPIN's own question, asked of held-out prompts: does the model prefer y over its y'?
        "eval/self_preference": float(np.mean(real_logps > sampled_logps)),
        "eval/length/real": float(np.mean([len(r) for r in real_ids])),
        "eval/length/generated": float(np.mean([len(s) for s in sampled_ids])),
        "eval/distinct_1": distinct_n(sampled_ids, 1),
        "eval/distinct_2": distinct_n(sampled_ids, 2),
        "eval/exact_match": float(np.mean([g.strip() == r.strip() for g, r in zip(greedy, real, strict=True)])),
    }


def load_hooks(names: list[str]) -> list[tuple[str, Hook]]:
    """Imports every `eval.hooks` entry; a bad one is a config error before anything starts."""
    hooks = []
    for i, name in enumerate(names):
        module, sep, function = name.partition(":")
        try:
            if not sep:
                raise ValueError("expected pkg.module:function")
            hook = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"eval.hooks[{i}] = {name!r}: cannot load it ({e})") from None
        hooks.append((function, hook))
    return hooks


def run_hooks(
    hooks: list[tuple[str, Hook]], checkpoint_dir: str, iteration: int, say: Callable[[str], None]
) -> dict[str, float]:
    """Each hook's numbers under eval/<function>/...; a hook that fails is reported and skipped."""
    metrics = {}
    for name, hook in hooks:
        try:
            result = hook(checkpoint_dir, iteration)
            metrics |= {f"eval/{name}/{key}": float(value) for key, value in result.items()}
        except Exception:  # noqa: BLE001 - a user's evaluation must not end a run of many hours
            say(f"[eval] hook {name} failed on iteration {iteration}; skipped:\n{traceback.format_exc(limit=-3)}")
    return metrics


def check_tasks(tasks: list[str], include_path: str | None) -> None:
    """Refuses lm-eval task names that lm-eval (with the user's own task dir) does not know,
    and a missing lm-eval, before anything starts."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("eval.lm_eval needs lm-evaluation-harness: pip install -e '.[eval]'") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"eval.lm_eval.include_path={include_path}: no such directory")
    known = TaskManager(include_path=include_path).all_tasks
    if missing := [t for t in tasks if t not in known]:
        where = f" nor in eval.lm_eval.include_path={include_path}" if include_path else ""
        raise ValueError(f"eval.lm_eval.tasks: {missing} are not lm-eval tasks{where}")
