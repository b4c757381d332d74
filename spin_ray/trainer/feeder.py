"""Feeds an iteration's pair stream to the train ranks through the channel, off the caller's thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray


class Feeder:
    """Feeds a stream of steps (one batch per rank) to worker group `generation`. The steps are
    made on one thread and sent on another, each message carrying every step made meanwhile (up
    to `MAX_STEPS`), so a fast stream costs few messages and a slow one waits for nothing.
    If the stream fails, the ranks are told to stop and `check` raises the cause."""

    MAX_STEPS = 64

    def __init__(self, channel: Any, generation: int, steps: Iterator[list[pa.Table]]):
        self.channel, self.generation = channel, generation
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._made: queue.Queue = queue.Queue(maxsize=2 * self.MAX_STEPS)
        threading.Thread(target=self._make, args=(steps,), daemon=True).start()
        threading.Thread(target=self._send, daemon=True).start()

    def _make(self, steps: Iterator[list[pa.Table]]) -> None:
        try:
            for step in steps:
                self._made.put(step)
        except BaseException as e:  # noqa: BLE001 - raised in the coordinator by `check`
            self.error = e
        self._made.put(None)

    def _send(self) -> None:
        end = False
        while not end and not self._stop.is_set():
            steps = [self._made.get()]
            while len(steps) < self.MAX_STEPS and not self._made.empty():
                steps.append(self._made.get())
            end = steps[-1] is None  # the stream's end mark, only ever last
            if end:
                steps.pop()
            if self.error is not None:
                self.channel.end_feed.remote(self.generation)  # the ranks stop waiting and report
                return
            batches = [[ray.put([step[rank] for step in steps])] for rank in range(len(steps[0]))] if steps else []
            if batches and not ray.get(self.channel.feed.remote(self.generation, batches)):
                return

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()
