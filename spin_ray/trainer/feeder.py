"""Feeds an iteration's pair stream to the train ranks through the channel, off the caller's thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator
from typing import Any

import pyarrow as pa
import ray


class Feeder:
    """Feeds a stream of steps (one batch per rank) to worker group `generation`. The steps are
    made on one thread and sent on another, each message carrying every step made meanwhile (up
    to `MAX_STEPS`), so a fast stream costs few messages and a slow one waits for nothing.
    If the stream fails, the ranks are told to stop and `check` raises the cause."""

    MAX_STEPS = 64
    POLL_S = 0.1  # how soon a thread waiting on the queue sees `stop`

    def __init__(self, channel: Any, generation: int, steps: Generator[list[pa.Table], None, None]):
        self.channel, self.generation = channel, generation
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._made: queue.Queue = queue.Queue(maxsize=2 * self.MAX_STEPS)
        threading.Thread(target=self._make, args=(steps,), daemon=True).start()
        threading.Thread(target=self._send, daemon=True).start()

    def _make(self, steps: Generator[list[pa.Table], None, None]) -> None:
        try:
            for step in steps:
                if not self._put(step):
                    return
        except BaseException as e:  # noqa: BLE001 - raised in the coordinator by `check`
            self.error = e
        finally:
            steps.close()  # on this thread, which runs it: its open file closes now, not at garbage collection
        self._put(None)

    def _put(self, step: list[pa.Table] | None) -> bool:
        """Queues a step for the sender; False once stopped. The sender may be gone (its group
        restarted): a plain put would wait forever on a full queue."""
        while not self._stop.is_set():
            try:
                self._made.put(step, timeout=self.POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def _send(self) -> None:
        try:
            self._send_all()
        finally:
            self._stop.set()  # nothing takes the maker's steps any more: it ends too

    def _send_all(self) -> None:
        end = False
        while not end and not self._stop.is_set():
            try:
                steps = [self._made.get(timeout=self.POLL_S)]
            except queue.Empty:
                continue
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
        """Ends both threads, without waiting for them (the maker may be inside the stream, waiting
        for its next pairs): the sender before its next message, the maker before its next step,
        closing the stream and so the file it reads."""
        self._stop.set()
