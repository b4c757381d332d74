"""Prompts to the engines: the seeded order and per-prompt seeds, and the stream of answers.

An iteration's prompts are written in a seeded permutation (seed + t) as batch files, one
generation request each, so no process holds them whole; Ray Data's tasks read the files and
the engines answer them in that order (spin_ray.engines.client.through_engines).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from spin_ray.config import GenerationConfig
from spin_ray.data import Example, TrainingSet, write_permuted
from spin_ray.engines.client import Batch, through_engines


def sample_seed(run_seed: int, iteration: int, uid: str) -> int:
    """A distinct seed per (run, iteration, example): vLLM seeds each request on its own, so one
    shared seed would give identical samples for repeated prompts."""
    digest = hashlib.sha256(f"{run_seed}/{iteration}/{uid}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def write_prompts(train: TrainingSet, seed: int, t: int, dest: Path, batch_size: int) -> list[Path]:
    """Iteration t's prompts in a seeded permutation (spin_ray.pairs, 1.), with their sampling
    seeds, as files of one generation batch each."""

    def with_seeds(table: pa.Table) -> pa.Table:
        seeds = [sample_seed(seed, t, uid) for uid in table["uid"].to_pylist()]
        return table.append_column("seed", pa.array(seeds, pa.int64()))

    order = np.random.default_rng(seed + t).permutation(train.records)
    return write_permuted(train.path, order, dest, batch_size, with_seeds)


def example_rows(examples: list[Example], seed: int) -> pa.Table:
    """Held-out examples as engine rows, with the same sampling seeds every iteration."""
    return pa.Table.from_pylist(
        [
            {
                "uid": e.uid,
                "prompt": e.prompt,
                "real": e.real,
                "prompt_ids": e.prompt_ids,
                "real_ids": e.real_ids,
                "seed": sample_seed(seed, 0, e.uid),
            }
            for e in examples
        ]
    )


def answered(
    rows: pa.Table | list[Path], op: Batch, cfg: GenerationConfig, advance: Callable[[int], None]
) -> Iterator[pa.Table]:
    """`rows` through the engines' `op`, batch by batch as they finish, counted by `advance`."""
    done = 0
    for batch in through_engines(rows, op, cfg).iter_batches(batch_size=None, batch_format="pyarrow"):
        done += batch.num_rows
        advance(done)
        yield batch
