"""The mailboxes between the coordinator and the long-lived train ranks, safe across restarts.

A `Task` names the `SpinWorker` method it runs (the function itself, not its name: a rename
fails where the task is built). Every task carries an id and every reply names the task it
answers, so a restarted worker's greeting is never mistaken for a result. A worker that (re)starts
says `hello` and gets the weights to load (the latest exported p_t, and t); tasks queued for its
predecessor are dropped, and no task is queued while a group is forming: a rank of the new group
must never run a task alone, its collectives would wait forever for the others. Once every rank
of the new group has said hello, `generation` goes up and the coordinator re-posts whatever was
interrupted. One rank's failure is reported at once (the others may be stuck in a collective),
and a task's replies are handed over once, so no reply (an export's weights in the object
store) outlives its reading. An iteration's pair batches come through
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
    # Raised inside a collective, as when a peer died: Ray Train restarts the group, so this
    # failure is not reported before the others reply; any other is reported at once.
    in_collective: bool = False


@dataclass(frozen=True)
class State:
    """What `poll` tells the coordinator about a task and the group running it."""

    results: list[Any] | None  # every rank's reply once all have replied, or as soon as one failed
    generation: int
    workers: list[dict[str, Any] | None]  # pid and node per rank
    beats: dict[int, tuple[float, str]]  # rank -> (time, what it is doing)
    steps: dict[int, tuple[int, int]]  # rank -> (optimizer steps done, of how many)
    now: float


@ray.remote(num_cpus=0)
class Channel:
    FEED_AHEAD = 8

    def __init__(self, world_size: int, model_path: str, iteration: int):
        self.world_size = world_size
        self.model_path, self.iteration = model_path, iteration  # what a (re)started rank loads: p_t, t
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

    async def hello(self, rank: int, info: dict[str, Any]) -> tuple[str, int]:
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
        return self.model_path, self.iteration

    async def set_model_path(self, path: str, iteration: int) -> None:
        """Rank 0 says so the moment p_t's checkpoint is complete: a group that restarts after it loads p_t."""
        self.model_path, self.iteration = path, iteration

    async def holds(self) -> int:
        """t of the p_t a group that starts now loads."""
        return self.iteration

    async def groups(self) -> int:
        return self.generation

    async def post(self, tasks: list[Task], generation: int) -> int:
        """Queues one task per rank if the group is still `generation` and no new group is forming;
        returns the current one (a group that restarted since the caller last looked must get the
        task after its hello)."""
        if generation == self.generation and not self.greeted:
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
        results = None
        failed = any(isinstance(r, Failure) and not r.in_collective for r in replies.values())
        if len(replies) == self.world_size or failed:
            results = [replies.get(r) for r in range(self.world_size)]
            del self.replies[task_id]
        return State(
            results=results,
            generation=self.generation,
            workers=[self.workers.get(r) for r in range(self.world_size)],
            beats=dict(self.beats),
            steps=dict(self.steps),
            now=time.time(),
        )
