"""Held-out metrics any user can read, and user hooks that add their own.

The engines produce three passes over the held-out prompts (a fresh sample y' per prompt, both
answers scored, a greedy answer); the functions here turn them into numbers. A hook is
`pkg.module:function(checkpoint_dir, iteration) -> dict`, checked at start and isolated at run
time: a failing hook is reported and the run goes on. lm-eval's tasks are checked at start and
isolated the same way.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

Hook = Callable[[str, int], dict[str, float]]
# lm-eval request types the engines do not answer: spin_ray.loop.harness.EngineLM scores fixed
# continuations and generates, but has no rolling (whole-document perplexity) scoring.
UNSCORED_OUTPUT_TYPES = ("loglikelihood_rolling",)


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
        prefixed = partial(_prefixed, name, hook, checkpoint_dir, iteration)
        metrics |= isolated(f"hook {name}", iteration, say, prefixed)
    return metrics


def _prefixed(name: str, hook: Hook, checkpoint_dir: str, iteration: int) -> dict[str, float]:
    return {f"eval/{name}/{key}": float(value) for key, value in hook(checkpoint_dir, iteration).items()}


def isolated(
    what: str, iteration: int, say: Callable[[str], None], evaluate: Callable[[], dict[str, float]]
) -> dict[str, float]:
    """`evaluate()`'s metrics, or none when it fails: the failure is reported and the run goes on."""
    try:
        return evaluate()
    except Exception:  # noqa: BLE001 - an evaluation must not end a run of many hours after training
        say(f"[eval] {what} failed on iteration {iteration}; skipped:\n{traceback.format_exc(limit=-3)}")
        return {}


def check_tasks(tasks: list[str], include_path: str | None) -> None:
    """Refuses lm-eval task names that lm-eval (with the user's own task dir) does not know, tasks
    (or groups and tags holding them) whose requests the engines do not answer, and a missing
    lm-eval, before anything starts: lm-eval runs after iteration 1 is trained."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("eval.lm_eval needs lm-evaluation-harness: pip install -e '.[eval]'") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"eval.lm_eval.include_path={include_path}: no such directory")
    index = TaskManager(include_path=include_path).task_index
    if missing := [t for t in tasks if t not in index]:
        where = f" nor in eval.lm_eval.include_path={include_path}" if include_path else ""
        raise ValueError(f"eval.lm_eval.tasks: {missing} are not lm-eval tasks{where}")
    unscored = {
        name: leaf
        for name in tasks
        for leaf, config in _leaf_tasks(index, name, set())
        if config.get("output_type") in UNSCORED_OUTPUT_TYPES
    }
    if unscored:
        named = ", ".join(name if name == leaf else f"{name} (its task {leaf})" for name, leaf in unscored.items())
        raise ValueError(
            f"eval.lm_eval.tasks: {named}: the engines do not answer {'/'.join(UNSCORED_OUTPUT_TYPES)} requests "
            "(perplexity over whole documents); leave these tasks out, or score the checkpoints with lm-eval's own "
            "models"
        )


def _leaf_tasks(index: dict[str, Any], name: str, seen: set[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, YAML config) of every task `name` stands for: itself, or a group's or tag's members.
    Python-class tasks have no config to read here: `isolated` covers them at run time."""
    entry = index.get(name)
    if entry is None or name in seen:  # an inline subgroup, or a group met twice
        return
    seen.add(name)
    if entry.kind.name == "TAG":  # a tag's entry lists its members in `tags`
        members = list(entry.tags)
    elif entry.kind.name == "GROUP":
        members = [m if isinstance(m, str) else m.get("task", m.get("group")) for m in entry.cfg.get("task", [])]
    else:
        yield name, entry.cfg or {}
        return
    for member in sorted(members):
        yield from _leaf_tasks(index, member, seen)
