"""Ray Train + DeepSpeed SPIN trainer whose workers live across all iterations.

One `TorchTrainer.fit()` per job, not per iteration (a fit costs ~36 s of start-up on CPU against
seconds of training). The coordinator hands each iteration's data shards to the running workers
through a small `Channel` actor and collects what they return: metrics and, from rank 0, the new
weights. The policy a worker holds at the end of iteration t is p_t: it becomes the next
reference in memory, without a reload from disk.
"""

from __future__ import annotations

import asyncio
import math
import os
import queue
import shutil
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import torch

from spin_ray.config import Config
from spin_ray.console import name_log
from spin_ray.data import pad_pairs
from spin_ray.loss import sequence_logps, sft_loss, spin_loss, spin_metrics
from spin_ray.pairs import PairStream
from spin_ray.sync import Spec, pack, send_buckets, weight_group
from spin_ray.tracking import record_event


@ray.remote(num_cpus=0)
class Channel:
    """Mailboxes between the coordinator and the long-lived train workers, safe across restarts.

    Every task carries an id and every reply names the task it answers, so a restarted worker's
    greeting is never mistaken for a result. A worker that (re)starts says `hello` and gets the
    weights to load (the latest exported p_t); tasks queued for its predecessor are dropped. Once
    every rank of a new group has said hello, `generation` goes up and the driver re-posts
    whatever was interrupted. A streamed iteration's pair batches come through `feed`, a step
    (batches for every rank) at a time, at most `FEED_AHEAD` messages ahead of the slowest rank.
    """

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
        self.beats: dict[int, tuple[float, str]] = {}  # rank -> (time, what it is doing)
        self.steps: dict[int, tuple[int, int]] = {}  # rank -> (optimizer steps done, of how many)
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

    async def post(self, task_id: int, tasks: list[dict[str, Any]], generation: int) -> int:
        """Queues one task per rank if the group is still `generation`; returns the current one
        (a group that restarted since the caller last looked must get the task after its hello)."""
        if generation == self.generation:
            self.steps.clear()  # the progress of the task before is not this one's
            for queue, task in zip(self.tasks, tasks, strict=True):
                queue.put_nowait({"task_id": task_id, **task})
        return self.generation

    async def next_task(self, rank: int) -> dict[str, Any]:
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

    async def poll(self, task_id: int) -> dict[str, Any]:
        replies = self.replies.get(task_id, {})
        return {
            "results": [replies[r] for r in range(self.world_size)] if len(replies) == self.world_size else None,
            "generation": self.generation,
            "workers": [self.workers.get(r) for r in range(self.world_size)],
            "beats": dict(self.beats),
            "steps": dict(self.steps),
            "now": time.time(),
        }


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {
            "stage": t.zero_stage,
            # 0: partition every parameter, however small, so ZeRO-3 gathers are always exercised.
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, schedule: str) -> float:
    """Linear warmup, then linear decay to 0 or constant, over one iteration's optimizer steps."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def build_cpu_ops() -> None:
    """Builds DeepSpeed's CPU all-reduce op once per machine (scripts/setup.sh calls this), so that
    no job pays for the build.

    torch builds such ops with the first `ninja` on PATH. Two ninja versions (the system's and this
    environment's) each take the other's build log for a stale one and rebuild the op: 30-140 s
    of both cores at a trainer's start, and a killed build leaves a lock that every later start
    waits on. So every process uses this environment's ninja, the pinned one.
    """
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()  # what deepspeed.initialize would do first (nothing off CPU)


class SpinWorker:
    """The state one training rank keeps for the whole job: policy, reference, optimizer."""

    def __init__(self, cfg: Config, model_path: str):
        build_cpu_ops()  # before deepspeed.initialize loads it
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.integrations import HfDeepSpeedConfig

        self.cfg = cfg
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.beat: Callable[..., None] = lambda what, steps=None: None  # progress for the driver's stall check
        self.next_batch: Callable[[], ray.ObjectRef] = lambda: None  # the channel's next fed batch
        ds_config = deepspeed_config(cfg)
        # Kept alive so from_pretrained loads straight into ZeRO-3 partitions (a 70B model never
        # exists whole on one rank).
        self._hf_ds = HfDeepSpeedConfig(ds_config) if cfg.train.zero_stage == 3 else None

        policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if cfg.train.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        optimizer_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.RMSprop
        optimizer = optimizer_cls(policy.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer, config=ds_config)
        self.reference = None
        if cfg.spin.reference == "model" and cfg.spin.objective == "spin":
            reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
            reference.requires_grad_(False)
            if cfg.train.zero_stage == 3:
                self.reference = deepspeed.initialize(model=reference, config=ds_config)[0]
            else:
                dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
                self.reference = reference.to(device=self.engine.device, dtype=dtype[cfg.model.dtype])
            self.reference.eval()

    def _refresh_reference(self) -> None:
        """reference := policy, in memory. Under ZeRO-3 both models are partitioned the same way,
        so each rank copies only its own shard."""
        for ref, pol in zip(self.reference.parameters(), self.engine.module.parameters(), strict=True):
            if hasattr(pol, "ds_tensor"):
                ref.ds_tensor.data.copy_(pol.ds_tensor.data)
            else:
                ref.data.copy_(pol.data)

    def _logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_logps(logits, batch["input_ids"], batch["response_mask"])

    def _reset_optimizer(self) -> None:
        # Each SPIN iteration is a fresh fine-tuning run from p_t, as in the official recipe.
        inner = self.optimizer
        while hasattr(inner, "optimizer"):
            inner = inner.optimizer
        inner.state.clear()

    def step_batch(self, rows: dict[str, Any]) -> dict[str, float]:
        """One micro batch of pairs: real and generated in one forward pass."""
        if self.cfg.spin.objective == "sft":
            return self.sft_step(rows)
        n = len(rows["prompt_ids"])
        prompts = [list(p) for p in rows["prompt_ids"]] * 2
        responses = [list(r) for r in rows["real_ids"]] + [list(g) for g in rows["generated_ids"]]
        batch = {k: v.to(self.engine.device) for k, v in pad_pairs(prompts, responses, self.pad_id).items()}
        if self.reference is not None:
            with torch.no_grad():
                ref = self._logps(self.reference, batch)
            ref_real, ref_generated = ref[:n], ref[n:]
        else:
            ref_real = torch.as_tensor(rows["ref_real_logps"], dtype=torch.float32, device=self.engine.device)
            ref_generated = torch.as_tensor(rows["ref_generated_logps"], dtype=torch.float32, device=self.engine.device)
        policy = self._logps(self.engine, batch)
        losses, real_rewards, generated_rewards = spin_loss(
            policy[:n], policy[n:], ref_real, ref_generated, self.cfg.spin.beta, self.cfg.spin.loss_type
        )
        self.engine.backward(losses.mean())
        self.engine.step()
        return spin_metrics(losses, real_rewards, generated_rewards, policy[:n], policy[n:])

    def sft_step(self, rows: dict[str, Any]) -> dict[str, float]:
        """One micro batch of the baseline: the real answers only, no reference."""
        prompts, real = [list(p) for p in rows["prompt_ids"]], [list(r) for r in rows["real_ids"]]
        batch = {k: v.to(self.engine.device) for k, v in pad_pairs(prompts, real, self.pad_id).items()}
        logps = self._logps(self.engine, batch)
        loss = sft_loss(logps, batch["response_mask"][:, 1:].sum(-1))
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.item(), "logps/real": logps.detach().mean().item()}

    def _mean_over_ranks(self, metrics: list[dict[str, float]]) -> dict[str, float]:
        keys = sorted(metrics[0])
        # On the engine's device: NCCL reduces only GPU tensors.
        local = torch.tensor([[m[k] for k in keys] for m in metrics], device=self.engine.device).mean(0)
        torch.distributed.all_reduce(local)
        return dict(zip(keys, (local / self.world_size).tolist(), strict=True))

    def train(self, iteration: int, shard: ray.data.Dataset | None, rows_per_rank: int) -> dict[str, Any]:
        """Trains p_t from p_{t-1} on this rank's shard, or (None) on the batches fed to it through
        the channel; returns the log lines (rank-averaged)."""
        t = self.cfg.train
        if self.reference is not None:
            self._refresh_reference()
        self._reset_optimizer()
        micro_steps = math.ceil(rows_per_rank / t.batch_size) * t.epochs
        total_steps = max(1, micro_steps // t.grad_accum)
        start = time.perf_counter()
        logs, window = [], []
        micro = 0
        for epoch in range(t.epochs):
            if shard is None:  # spin.stream: config allows one epoch only
                batches = self.fed_batches(math.ceil(rows_per_rank / t.batch_size))
            else:
                batches = shard.iter_batches(batch_size=t.batch_size, batch_format="numpy")
            for rows in batches:
                lr = lr_at(micro // t.grad_accum, total_steps, t.lr, t.warmup_ratio, t.schedule)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                window.append(self.step_batch(rows))
                micro += 1
                steps = (micro // t.grad_accum, total_steps)
                self.beat(f"training iteration {iteration}, micro-batch {micro}/{micro_steps}", steps)
                if micro % t.log_every == 0 or micro == micro_steps:
                    line = {"iteration": iteration, "step": micro, "epoch": epoch, "lr": lr}
                    line |= self._mean_over_ranks(window)
                    window = []
                    logs.append(line)
                    if self.rank == 0:
                        shown = " ".join(f"{k} {v:.4f}" for k, v in line.items() if "/" in k or k == "loss")
                        print(f"[train] iteration {iteration} micro-batch {micro}/{micro_steps} {shown}", flush=True)
        return {"logs": logs, "seconds": time.perf_counter() - start, "steps": micro, "pid": os.getpid()}

    def fed_batches(self, count: int) -> Iterator[dict[str, list]]:
        """`count` batches from the channel, which sends several at a time; the next message is
        asked for while this one's batches train."""
        pending, left = self.next_batch(), count
        while left:
            item = ray.get(pending)
            if item is None:
                raise RuntimeError("the coordinator stopped the pair stream (its log says why)")
            batches = ray.get(item[0])
            left -= len(batches)
            if left:
                pending = self.next_batch()
            for batch in batches:
                yield batch.to_pydict()

    @torch.no_grad()
    def score(self, shard: ray.data.Dataset) -> dict[str, list]:
        """Summed log-probs of both sides of each pair under the current policy (for checks
        against exported checkpoints and the engines' numerics)."""
        out: dict[str, list] = {"uid": [], "real_logps": [], "generated_logps": []}
        for rows in shard.iter_batches(batch_size=self.cfg.train.batch_size, batch_format="numpy"):
            n = len(rows["uid"])
            prompts = [list(p) for p in rows["prompt_ids"]] * 2
            responses = [list(r) for r in rows["real_ids"]] + [list(g) for g in rows["generated_ids"]]
            batch = {k: v.to(self.engine.device) for k, v in pad_pairs(prompts, responses, self.pad_id).items()}
            logps = self._logps(self.engine, batch).tolist()
            out["uid"] += [str(u) for u in rows["uid"]]
            out["real_logps"] += logps[:n]
            out["generated_logps"] += logps[n:]
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named weights on rank 0 (None elsewhere); every rank must call this."""
        if self.cfg.train.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict()
        return {k: v.detach().cpu() for k, v in state.items()} if self.rank == 0 else None

    def export(self, model_dir: str, pack_weights: bool) -> dict[str, Any]:
        """HF checkpoint (rank 0) and the weights for the engines' object-store path.

        The checkpoint is all a restart needs: each iteration starts a fresh optimizer from p_t,
        so optimizer state is never carried across iterations and is not saved."""
        state = self.full_state_dict()
        result: dict[str, Any] = {}
        if self.rank == 0:
            final = Path(model_dir)
            tmp = final.with_name(final.name + ".tmp")
            self.engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            if final.exists():  # left by an export whose reply was lost to a restart
                shutil.rmtree(final)
            tmp.rename(final)  # atomic: a crash never leaves a half-written checkpoint behind
            if pack_weights:
                result["weights"] = ray.put(pack(state))
        return result

    def weight_specs(self) -> list[Spec]:
        """(name, full shape, dtype) of every parameter; tied weights appear once."""
        return [
            (name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
            for name, p in self.engine.module.named_parameters()
        ]

    def weight_address(self) -> tuple[str, int] | None:
        """Rank 0 hosts the weight-sync group's rendezvous: a fresh port for every (re)connect."""
        return free_address() if self.rank == 0 else None

    def join_weight_group(self, master: str, port: int, world_size: int, timeout_s: float) -> dict[str, Any]:
        self.weight_group = weight_group(master, port, self.rank, world_size, timeout_s)
        return {}

    def broadcast_weights(self, plan: list[list[Spec]]) -> dict[str, Any]:
        """Every rank sends its own part of each bucket (under ZeRO-3: its own partition)."""
        try:
            send_buckets(self.weight_group, plan, dict(self.engine.module.named_parameters()), self.world_size)
        except Exception:
            self.weight_group = None  # dropping it closes the sockets, so no engine waits for the rest
            raise
        return {}


def on_this_node() -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def free_address() -> tuple[str, int]:
    """This node's IP and a free TCP port, for the weight-sync group's rendezvous."""
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def worker_loop(config: dict[str, Any]) -> None:
    """The train_loop_per_worker: say hello, load the current p_t, then do tasks until told to
    stop. Ray Train runs it again on a fresh group after a worker or its node is lost."""
    cfg: Config = config["cfg"]
    channel = config["channel"]
    if not cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(max(1, int(cfg.train.num_cpus)))
    rank = ray.train.get_context().get_world_rank()
    name_log(f"train-rank{rank}")
    here = {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}
    model_path = ray.get(channel.hello.remote(rank, here))
    worker = SpinWorker(cfg, model_path)
    worker.beat = lambda what, steps=None: channel.beat.remote(rank, what, steps)
    worker.next_batch = lambda: channel.next_batch.remote(rank)
    worker.beat("ready")
    while True:
        task = ray.get(channel.next_task.remote(rank))
        task_id, kind = task.pop("task_id"), task.pop("kind")
        print(f"[train] rank {rank} runs {kind} (task {task_id})", flush=True)
        if kind == "stop":
            return
        try:
            # Tasks name a SpinWorker method; the coordinator decides what runs, in what order.
            result = getattr(worker, kind)(**task)
        except Exception:  # noqa: BLE001 - reported to the driver, which decides what to do
            result = {"error": f"rank {rank} failed in {kind}:\n{traceback.format_exc()}"}
        ray.get(channel.reply.remote(rank, task_id, result))


class TrainerError(RuntimeError):
    """The trainer failed, stalled or ran out of restarts; the message says which and what to do."""


class GroupRestarted(Exception):
    """The worker group restarted during a task that cannot simply be posted again."""


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


class Trainer:
    """Driver-side handle: starts the long-lived workers, sends them work, and re-sends it to a
    restarted group (Ray Train's FailureConfig restarts the group when a worker or node is lost)."""

    def __init__(self, cfg: Config, model_path: str):
        self.cfg = cfg
        # On this node (the head): a 0-CPU actor elsewhere would not keep its node busy, and the
        # autoscaler would remove the node from under it.
        self.channel = Channel.options(scheduling_strategy=on_this_node()).remote(cfg.train.num_workers, model_path)
        self.generation = 0  # worker groups seen; goes up on every restart
        self.restarts: list[dict[str, Any]] = []
        self.pids: list[int] = []
        self.nodes: list[str] = []
        self._task_id = 0
        self._error: BaseException | None = None
        self._stopping = False
        self._specs: list[Spec] | None = None
        self._thread = threading.Thread(target=self._fit, daemon=True)
        self._thread.start()  # returns at once: the workers start while engines load and generate

    @property
    def world_size(self) -> int:
        return self.cfg.train.num_workers

    def wait_ready(self) -> list[Spec]:
        """Waits until every rank is up; returns (name, shape, dtype) of every weight."""
        if self._specs is None:
            self._specs = self.call("weight_specs")[0]
        return self._specs

    def ready_at(self) -> float:
        """When the last rank was up (epoch seconds), for the start-up breakdown."""
        return ray.get(self.channel.ready_at.remote())

    def _torch_trainer(self, attempt: int) -> Any:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        t = self.cfg.train
        resources = {"CPU": t.num_cpus} | ({t.resource: 1} if t.resource else {}) | ({"GPU": 1} if t.use_gpu else {})
        return TorchTrainer(
            worker_loop,
            train_loop_config={"cfg": self.cfg, "channel": self.channel},
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=f"spin-train-{attempt}",
                storage_path=str(Path(self.cfg.run.output_dir).resolve() / "ray_train"),
                failure_config=FailureConfig(max_failures=t.max_restarts),
            ),
        )

    def _fit(self) -> None:
        """Runs Ray Train until the workers are told to stop. Ray Train restarts the worker group
        itself when a worker process dies; a lost node can instead surface as a controller error
        it does not retry ("actor unavailable"), and then a new run starts here, up to
        train.max_restarts times. Its workers say hello and get the interrupted task again."""
        for attempt in range(self.cfg.train.max_restarts + 1):
            try:
                self._torch_trainer(attempt).fit()
                return
            except BaseException as e:  # noqa: BLE001 - surfaced to the coordinator in call()
                self._error = e
                if self._stopping:
                    return
                print(f"[train] Ray Train stopped ({type(e).__name__}); starting a new run", flush=True)

    def call(
        self,
        kind: str,
        per_rank: list[dict[str, Any]] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        check: Callable[[], None] = lambda: None,
        again: bool = True,
        **task: Any,
    ) -> list[Any]:
        """Runs a SpinWorker method on every rank (the same `task`, or one dict per rank) and
        returns every rank's result; `on_progress(done, total)` hears rank 0's optimizer steps,
        `check()` runs at every poll (its error ends the wait). A group that restarts meanwhile
        gets the task again, or (`again=False`) GroupRestarted is raised."""
        tasks = [{"kind": kind, **t} for t in per_rank] if per_rank else [{"kind": kind, **task}] * len(self._ranks)
        posted = time.time()
        self._task_id += 1
        self._post(tasks)
        while True:
            state = ray.get(self.channel.poll.remote(self._task_id))
            if state["generation"] > self.generation:
                if self.generation:
                    restart = {"during": kind, "pids": self.pids, "recovery_s": time.time() - posted}
                    self.restarts.append(restart)
                    record_event(self.cfg.run.output_dir, "trainer_restarted", **restart)
                    print(f"[train] worker group restarted during {kind}; running it again", flush=True)
                restarted = bool(self.generation)
                self.generation = state["generation"]
                self.pids = [w["pid"] for w in state["workers"]]
                self.nodes = [w["node"] for w in state["workers"]]
                if restarted and not again:
                    raise GroupRestarted(kind)
                self._task_id += 1
                self._post(tasks)
                posted = state["now"]
                continue
            check()
            if on_progress and 0 in state["steps"]:
                on_progress(*state["steps"][0])
            if state["results"] is not None:
                errors = [r["error"] for r in state["results"] if isinstance(r, dict) and "error" in r]
                if errors:
                    raise TrainerError(errors[0])
                return state["results"]
            if not self._thread.is_alive():
                raise TrainerError(
                    f"training workers stopped after {len(self.restarts)} restart(s) "
                    f"(train.max_restarts={self.cfg.train.max_restarts}): {self._error!r}"
                ) from self._error
            self._check_stall(kind, state, posted)
            time.sleep(0.2)

    def _post(self, tasks: list[dict[str, Any]]) -> None:
        # Posted only to the group the driver knows; a newer one gets it after the poll sees it.
        ray.get(self.channel.post.remote(self._task_id, tasks, self.generation))

    @property
    def _ranks(self) -> range:
        return range(self.world_size)

    def _check_stall(self, kind: str, state: dict[str, Any], posted: float) -> None:
        """No silent hangs: ranks that show no progress for too long are reported with what each
        was last doing (starting up gets the longer start-up deadline)."""
        c = self.cfg.train
        stalled = []
        for rank in self._ranks:
            when, what = state["beats"].get(rank, (posted, "waiting to be scheduled"))
            limit = c.start_timeout_s if what in ("starting", "waiting to be scheduled") else c.stall_timeout_s
            quiet = state["now"] - max(when, posted)
            if quiet > limit:
                pid = (state["workers"][rank] or {}).get("pid")
                stalled.append(f"rank {rank} (pid {pid}) silent for {quiet:.0f} s, last: {what!r}")
        if stalled:
            raise TrainerError(
                f"the trainer stalled while running {kind!r}: " + "; ".join(stalled) + ". A frozen worker or a hung "
                f"collective (the other ranks wait for it), or missing resources ({ray.available_resources()} free). "
                "Check that rank's log and node; raise train.stall_timeout_s (train.start_timeout_s for start-up) "
                "if a step is legitimately this slow."
            )

    def set_model_path(self, path: str) -> None:
        """The weights a restarted group loads: the latest exported p_t."""
        ray.get(self.channel.set_model_path.remote(path))

    def train(
        self,
        iteration: int,
        pairs: ray.data.Dataset | PairStream,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """One SPIN iteration of training on `pairs`; equal rows per rank, so equal steps."""
        if isinstance(pairs, PairStream):
            return self._train_stream(iteration, pairs, on_progress)
        n = self.world_size
        pairs = pairs.materialize()  # count and split must not run a lazy pipeline (engine scoring) twice
        total = pairs.count()
        if total % n:
            print(f"[train] dropping {total % n} of {total} pairs so every rank runs the same steps")
        shards = pairs.split(n, equal=True)
        per_rank = [{"iteration": iteration, "shard": s, "rows_per_rank": total // n} for s in shards]
        return self.call("train", per_rank, on_progress)[0]

    def _train_stream(
        self, iteration: int, pairs: PairStream, on_progress: Callable[[int, int], None] | None
    ) -> dict[str, Any]:
        """Feeds the steps to the ranks as they come. A group that restarts gets the stream again
        from its first step: its order is replayable (spin_ray.pairs)."""
        self.wait_ready()  # the steps are fed to one known group
        task = {"iteration": iteration, "shard": None, "rows_per_rank": pairs.total // self.world_size}
        while True:
            feeder = Feeder(self.channel, self.generation, pairs.steps(self.world_size))
            try:
                return self.call("train", [task] * self.world_size, on_progress, feeder.check, again=False)[0]
            except GroupRestarted:
                continue
            finally:
                feeder.stop()

    def score(self, pairs: pa.Table) -> dict[str, tuple[float, float]]:
        """{uid: (log p(real), log p(generated))} under the current policy."""
        n = self.cfg.train.num_workers
        # Pad with repeated rows to a multiple of the world size: under ZeRO-3 every forward pass
        # is a collective, so all ranks must run the same number of them.
        padded = pa.concat_tables([pairs, pairs.slice(0, -pairs.num_rows % n)])
        shards = ray.data.from_arrow(padded).split(n, equal=True)
        scores = {}
        for r in self.call("score", [{"shard": s} for s in shards]):
            scores |= dict(zip(r["uid"], zip(r["real_logps"], r["generated_logps"], strict=True), strict=True))
        return scores

    def export(self, model_dir: Path, pack_weights: bool = True) -> ray.ObjectRef | None:
        """Writes the HF checkpoint; returns the object-store ref of the packed weights."""
        weights = self.call("export", model_dir=str(model_dir), pack_weights=pack_weights)[0].get("weights")
        self.set_model_path(str(model_dir))
        return weights

    def stop(self) -> None:
        self._stopping = True
        self._task_id += 1
        self._post([{"kind": "stop"}] * len(self._ranks))
        self._thread.join(timeout=120)
