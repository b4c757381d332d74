"""The mailboxes between the coordinator and the long-lived train ranks, safe across restarts.

A `Task` names the `SpinWorker` method it runs (the function itself, not its name: a rename
fails where the task is built). Every task carries an id and every reply names the task it
answers, so a restarted worker's greeting is never mistaken for a result. A worker that (re)starts
says `hello` and gets the weights to load (the latest exported p_t); tasks queued for its
predecessor are dropped. Once every rank of a new group has said hello, `generation` goes up and
the coordinator re-posts whatever was interrupted. An iteration's pair batches come through
`feed`, a step (batches for every rank) at a time, at most `FEED_AHEAD` messages ahead of the
slowest rank.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray


@dataclass(frozen=True)
class Task:
    id: int
    method: Callable[..., Any] | None  # a SpinWorker method, called with the worker; None: stop
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """What a rank replies when its task raised: the coordinator raises it as a TrainerError."""

    message: str


@dataclass(frozen=True)
class State:
    """What `poll` tells the coordinator about a task and the group running it."""

    results: list[Any] | None  # every rank's reply, once all have replied
    generation: int
    workers: list[dict[str, Any] | None]  # pid and node per rank
    beats: dict[int, tuple[float, str]]  # rank -> (time, what it is doing)
    steps: dict[int, tuple[int, int]]  # rank -> (optimizer steps done, of how many)
    now: float


@ray.remote(num_cpus=0)
class Channel:
    FEED_AHEAD = 8

    def __init__(self, world_size: int, model_path: str):
        self.world_size = world_size
        self.model_path = model_path
        self.tasks: list[asyncio.Queue] = [asyncio.Queue() for _ in range(world_size)]
        self.batches: list[asyncio.Queue] = [asyncio.Queue() for _ in range(world_size)]
        self.taken = asyncio.Event()
        self.replies: dict[int, dict[int, Any]] = {}
        self.workers: dict[int, dict[str, Any]] = {}
        self.greeted: set[int] = set()  # ranks of the group now starting
        self.generation = 0  # complete worker groups so far
        self.beats: dict[int, tuple[float, str]] = {}
        self.steps: dict[int, tuple[int, int]] = {}
        self.ready: dict[int, float] = {}  # rank -> when its model and DeepSpeed were up (last time)

    async def ready_at(self) -> float:
        return max(self.ready.values())

    async def hello(self, rank: int, info: dict[str, Any]) -> str:
        self.tasks[rank] = asyncio.Queue()
        self.workers[rank] = info
        self.greeted.add(rank)
        if len(self.greeted) == self.world_size:
            self.generation += 1
            self.greeted.clear()
            self.replies.clear()
            self.batches = [asyncio.Queue() for _ in range(self.world_size)]  # none meant for the last group
            self.taken.set()
        self.beats[rank] = (time.time(), "starting")
        return self.model_path

    async def set_model_path(self, path: str) -> None:
        self.model_path = path

    async def post(self, tasks: list[Task], generation: int) -> int:
        """Queues one task per rank if the group is still `generation`; returns the current one
        (a group that restarted since the caller last looked must get the task after its hello)."""
        if generation == self.generation:
            self.steps.clear()  # the progress of the task before is not this one's
            for queue, task in zip(self.tasks, tasks, strict=True):
                queue.put_nowait(task)
        return self.generation

    async def next_task(self, rank: int) -> Task:
        return await self.tasks[rank].get()

    async def feed(self, generation: int, message: list[list[ray.ObjectRef]]) -> bool:
        """Queues a message (a ref per rank to its batches) for group `generation` once there is
        room; False: that group is gone.
        Refs come wrapped in lists so that Ray hands them on instead of fetching them here."""
        while generation == self.generation and max(q.qsize() for q in self.batches) >= self.FEED_AHEAD:
            self.taken.clear()
            await self.taken.wait()  # a rank took a message, or a new group said hello
        if generation != self.generation:
            return False
        for mailbox, batches in zip(self.batches, message, strict=True):
            mailbox.put_nowait(batches)
        return True

    async def end_feed(self, generation: int) -> None:
        """The stream broke: every rank's next batch is None, so it stops and reports."""
        if generation == self.generation:
            for mailbox in self.batches:
                mailbox.put_nowait(None)

    async def next_batch(self, rank: int) -> list[ray.ObjectRef] | None:
        message = await self.batches[rank].get()
        self.taken.set()
        return message

    async def beat(self, rank: int, what: str, steps: tuple[int, int] | None = None) -> None:
        self.beats[rank] = (time.time(), what)
        if what == "ready":
            self.ready[rank] = time.time()
        if steps:
            self.steps[rank] = steps

    async def reply(self, rank: int, task_id: int, result: Any) -> None:
        self.replies.setdefault(task_id, {})[rank] = result
        self.beats[rank] = (time.time(), "idle")

    async def poll(self, task_id: int) -> State:
        replies = self.replies.get(task_id, {})
        return State(
            results=[replies[r] for r in range(self.world_size)] if len(replies) == self.world_size else None,
            generation=self.generation,
            workers=[self.workers.get(r) for r in range(self.world_size)],
            beats=dict(self.beats),
            steps=dict(self.steps),
            now=time.time(),
        )
