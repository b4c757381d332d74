"""An iteration's pairs as a stream, the one path from pairs on disk to the train ranks. With
`spin.stream` training starts on the first pairs while the engines still answer; without it, the
same stream starts once every pair is stored. The pairs never sit whole in one process (a parquet
part per source and the shuffle window).

The order the trainer sees is a pure function of the run seed and the pairs, never of timing:
  1. the prompts go to the engines in a seeded permutation (seed + t), and the answers come back
     in that order (Ray Data keeps it), each batch written to disk as it arrives (`Generation`);
  2. those pairs and the earlier iterations' (read back file by file) are interleaved at random:
     each next pair comes from a source with probability proportional to the pairs it has left;
  3. a shuffle window of `spin.shuffle_window` pairs: each pair out is a random one of the window;
  4. the first (pairs // ranks) * ranks pairs are dealt in steps: every rank gets `batch_size`
     consecutive pairs per step, so all ranks run the same steps;
  5. with train.epochs > 1, steps 2-4 run again over the same pairs, the generator carried on.
The SFT baseline streams the prompts of the same permutations with their real answers only, so it
trains on the same rows in the same order as SPIN would.
So the same pairs in the same order can be replayed from disk: to a trainer group that restarted,
or when a resumed iteration finds its pairs already generated.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spin_ray.stages import Generated

Row = dict[str, Any]
COLUMNS = ["uid", "prompt_ids", "real_ids", "generated_ids"]  # what training reads (SFT: no generated_ids)
# The engines' log-probs of each generated token, read from the iteration's own pairs only (those
# of p_{t-1}, the reference): training compares them with its own (gen/logprob_mismatch).
LOGPS = "generated_logps"


@dataclass
class PairStream:
    """What an iteration trains on: `steps(ranks, epochs)` makes the stream anew from its start
    (`deal`'s steps); `total` pairs in all."""

    total: int
    steps: Callable[[int, int], Iterator[list[pa.Table]]]
    new: Generation | None = None  # the generation it follows, if any

    def check(self) -> None:
        """Raises what ended that generation early: a reader still waiting to start need not wait."""
        if self.new is not None and self.new.error is not None:
            raise self.new.error


class Generation:
    """Iteration t's answers, made on a thread of their own: each batch the engines finish is
    written to `tmp` as part-<k>.parquet, in prompt order. Readers follow with `part(k)`."""

    def __init__(self, batches: Iterator[pa.Table], tmp: Path, expected: int):
        self.tmp, self.expected = tmp, expected
        self.parts, self.rows, self.tokens = 0, 0, 0
        self.error: BaseException | None = None
        self.finished = False
        self.seconds = 0.0
        self.on_first_part: Callable[[], Any] = lambda: None
        self._cond = threading.Condition()
        tmp.mkdir(parents=True, exist_ok=True)
        for stale in tmp.glob("part-*.parquet"):  # of an attempt that crashed
            stale.unlink()
        self._thread = threading.Thread(target=self._run, args=(batches,), daemon=True)
        self._thread.start()

    def _run(self, batches: Iterator[pa.Table]) -> None:
        tick = time.perf_counter()
        try:
            for batch in batches:
                path = self.tmp / f"part-{self.parts:06d}.parquet"
                try:
                    pq.write_table(batch, path)
                except OSError as e:  # a full disk, say: said plainly, and what is stored stays
                    path.unlink(missing_ok=True)
                    raise RuntimeError(
                        f"could not write {path}: {e}. The {self.parts} batches of pairs stored before it are kept; "
                        "free the space and rerun the same command: it resumes."
                    ) from e
                if not self.parts:
                    self.on_first_part()
                with self._cond:
                    self.parts += 1
                    self.rows += batch.num_rows
                    self.tokens += pa.compute.sum(batch["generated_tokens"]).as_py()
                    self._cond.notify_all()
            if self.rows != self.expected:
                raise RuntimeError(f"generation returned {self.rows} pairs for {self.expected} prompts")
        except BaseException as e:  # noqa: BLE001 - handed to whoever reads or waits
            self.error = e
        finally:
            self.seconds = time.perf_counter() - tick
            with self._cond:
                self.finished = True
                self._cond.notify_all()

    def part(self, k: int) -> Path | None:
        """Part k once written; None when generation ended with fewer parts."""
        with self._cond:
            self._cond.wait_for(lambda: self.parts > k or self.finished)  # an error finishes it too
            if self.error is not None:
                raise self.error
            return self.tmp / f"part-{k:06d}.parquet" if self.parts > k else None

    def wait(self) -> Generated:
        """Blocks until every prompt is answered and on disk."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        return Generated(self.seconds, self.tokens)


def pair_stream(
    dirs: list[Path],
    new: Generation | None,
    seed: int,
    window: int,
    batch_size: int,
    score: Callable[[Iterator[Row]], Iterator[Row]] | None = None,
) -> PairStream:
    """The stream of the pairs stored in `dirs` (earlier iterations first) and of `new`, in the
    order the module docstring gives; `score` adds reference log-probs on the way."""
    counts = [stored_count(d) for d in dirs]
    total = sum(counts) + (new.expected if new else 0)

    def steps(ranks: int, epochs: int = 1) -> Iterator[list[pa.Table]]:
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            last = len(dirs) - 1 if new is None else None
            sources = [(n, stored_rows(d, i == last)) for i, (n, d) in enumerate(zip(counts, dirs, strict=True))]
            sources += [(new.expected, generated_rows(new))] if new else []
            rows = window_shuffle(interleave(sources, rng), window, rng)
            yield from deal(score(rows) if score else rows, ranks, batch_size, total)

    return PairStream(total, steps, new)


def generated_rows(generation: Generation) -> Iterator[Row]:
    """The new pairs in prompt order, as their parts reach the disk."""
    for k in itertools.count():
        path = generation.part(k)
        if path is None:
            return
        names = pq.read_schema(path).names
        yield from _with_logps(
            pq.read_table(path, columns=[c for c in COLUMNS + [LOGPS] if c in names]).to_pylist(), True
        )


def stored_rows(pairs_dir: Path, current: bool = False) -> Iterator[Row]:
    """Stored pairs, file by file in name order (one file in memory at a time); `current`: the
    iteration's own (their engine log-probs are kept)."""
    for path in sorted(pairs_dir.glob("*.parquet")):
        file = pq.ParquetFile(path)
        for batch in file.iter_batches(columns=[c for c in COLUMNS + [LOGPS] if c in file.schema_arrow.names]):
            yield from _with_logps(batch.to_pylist(), current)


def _with_logps(rows: list[Row], keep: bool) -> list[Row]:
    """Every pair has the LOGPS key (a batch's columns are its first row's keys), None where not
    kept; the SFT baseline's rows (no generated answer) have none."""
    for row in rows:
        if "generated_ids" in row:
            row[LOGPS] = row.get(LOGPS) if keep else None
    return rows


def stored_count(pairs_dir: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in pairs_dir.glob("*.parquet"))


def interleave(sources: list[tuple[int, Iterator[Row]]], rng: np.random.Generator) -> Iterator[Row]:
    """A uniformly random interleaving of sources of known sizes: every source is spread over the
    whole stream (a byte per row of memory for the draw)."""
    counts = [n for n, _ in sources]
    for i in rng.permutation(np.repeat(np.arange(len(sources), dtype=np.uint8), counts)):
        yield next(sources[i][1])


def window_shuffle(rows: Iterator[Row], size: int, rng: np.random.Generator) -> Iterator[Row]:
    """A bounded shuffle: hold `size` rows; each row out is a random one of those held."""
    window: list[Row] = []
    for row in rows:
        if len(window) < size:
            window.append(row)
            continue
        i = int(rng.integers(size))
        yield window[i]
        window[i] = row
    rng.shuffle(window)
    yield from window


def deal(rows: Iterator[Row], ranks: int, batch_size: int, total: int) -> Iterator[list[pa.Table]]:
    """Steps of one table per rank, every rank the same rows per step: `batch_size`, and in the
    last step an equal share of what is left. The last total % ranks rows are dropped."""
    left = total // ranks * ranks
    while left > 0:
        step = list(itertools.islice(rows, min(ranks * batch_size, left)))
        if len(step) < min(ranks * batch_size, left):  # the ranks would wait for it forever
            raise RuntimeError(f"the pair stream ended {left - len(step)} pairs early")
        left -= len(step)
        each = len(step) // ranks
        yield [pa.Table.from_pylist(step[r * each : (r + 1) * each]) for r in range(ranks)]
