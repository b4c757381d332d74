"""One train rank, for the whole job: policy, reference and optimizer under DeepSpeed.

`worker_loop` is Ray Train's train_loop_per_worker. It says hello to the channel, loads the
current p_t and then runs the tasks it is given: each names a `SpinWorker` method. The policy a
rank holds at the end of iteration t is p_t; it becomes the next reference in memory, without a
reload from disk. A rank knows which t it holds, and refuses a task meant for other weights: a
group restarted from an older checkpoint can never export or send them as p_t.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
import torch

from spin_ray.cluster import free_address
from spin_ray.config import Config
from spin_ray.data import pad_pairs
from spin_ray.logs import name_log
from spin_ray.lora import adapter_files
from spin_ray.loss import sft_loss, spin_loss, spin_metrics, token_logps
from spin_ray.pairs import LOGPS
from spin_ray.private import zero3_full_state_dict
from spin_ray.rundir import replace_dir
from spin_ray.stages import Trained, distinct_only
from spin_ray.trainer.adapter import AdapterSnapshot, adapter_state, load_policy
from spin_ray.trainer.channel import Failure
from spin_ray.trainer.ds import accumulation, build_cpu_ops, deepspeed_config, lr_at
from spin_ray.weights import Spec, pack, send_buckets, weight_group


class StaleWeights(RuntimeError):
    """This rank holds another iteration's weights than the task needs."""


class SpinWorker:
    def __init__(self, cfg: Config, model_path: str, holds: int = 0):
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
        self.exported: Callable[[str, int], None] = lambda path, t: None  # tells the channel p_t is on disk
        self.holds = holds  # t of the p_t this rank's policy is
        self.mismatch = torch.zeros(3, dtype=torch.float64)  # this iteration's summed |difference|, tokens, max
        self.first_step = 0  # DeepSpeed's global step when the iteration began
        ds_config = deepspeed_config(cfg)
        # Kept alive so from_pretrained loads straight into ZeRO-3 partitions (a 70B model never
        # exists whole on one rank).
        self._hf_ds = HfDeepSpeedConfig(ds_config) if cfg.train.zero_stage == 3 else None

        if cfg.train.lora:
            policy = load_policy(cfg, model_path)
        else:
            policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
            if cfg.train.gradient_checkpointing:
                policy.gradient_checkpointing_enable()
        policy.train()  # from_pretrained leaves it in eval mode: no checkpointing, no adapter dropout
        optimizer_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.RMSprop
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = optimizer_cls(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer, config=ds_config)
        self.reference: Any = None
        if cfg.spin.reference == "model" and cfg.spin.objective == "spin" and cfg.train.lora:
            self.reference = AdapterSnapshot(self.engine.module)  # no second copy of the base weights
        elif cfg.spin.reference == "model" and cfg.spin.objective == "spin":
            reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
            reference.requires_grad_(False)
            if cfg.train.zero_stage == 3:
                self.reference = deepspeed.initialize(model=reference, config=ds_config)[0]
            else:
                dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
                self.reference = reference.to(device=self.engine.device, dtype=dtype[cfg.model.dtype])
            self.reference.eval()

    def _expect(self, t: int, task: str) -> None:
        if self.holds != t:
            raise StaleWeights(f"rank {self.rank} holds p_{self.holds}, but {task} needs p_{t}")

    def _refresh_reference(self) -> None:
        """reference := policy, in memory. Under ZeRO-3 both models are partitioned the same way,
        so each rank copies only its own shard."""
        if isinstance(self.reference, AdapterSnapshot):
            self.reference.refresh()
            return
        for ref, pol in zip(self.reference.parameters(), self.engine.module.parameters(), strict=True):
            if hasattr(pol, "ds_tensor"):
                ref.ds_tensor.data.copy_(pol.ds_tensor.data)
            else:
                ref.data.copy_(pol.data)

    def _logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per response token: [batch, length - 1], 0 elsewhere."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_logps(logits, batch["input_ids"], batch["response_mask"])

    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if not isinstance(self.reference, AdapterSnapshot):
                return self._logps(self.reference, batch)
            module = self.engine.module
            module.eval()
            with self.reference.swapped_in():
                logps = self._logps(module, batch)
            module.train()
            return logps

    def _compare_engines(self, rows: dict[str, Any], ours: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """The engines' log-probs of the generated tokens they sampled (this iteration's pairs)
        against ours under p_{t-1} (`ours`: the generated half of the batch): an engine that
        sampled with other weights than p_{t-1} shows here, whatever the reason."""
        n = len(rows["prompt_ids"])
        mask = batch["response_mask"][n:, 1:]
        for i, theirs in enumerate(rows.get(LOGPS) or []):
            if theirs:
                here = ours[i][mask[i]].detach().double().cpu()[: len(theirs)]
                diff = (here - torch.tensor(theirs[: len(here)], dtype=torch.float64)).abs()
                self.mismatch[0] += float(diff.sum())
                self.mismatch[1] += len(diff)
                self.mismatch[2] = max(float(self.mismatch[2]), float(diff.max()))

    def _mismatch_over_ranks(self) -> tuple[float, float] | None:
        """(mean, max) per-token |engine - trainer| log-prob difference, over every rank."""
        totals = self.mismatch[:2].to(self.engine.device)
        worst = self.mismatch[2:].to(self.engine.device)
        torch.distributed.all_reduce(totals)
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        return (float(totals[0] / totals[1]), float(worst[0])) if totals[1] else None

    def _batch(self, prompts: list, responses: list) -> dict[str, torch.Tensor]:
        padded = pad_pairs([list(p) for p in prompts], [list(r) for r in responses], self.pad_id)
        return {k: v.to(self.engine.device) for k, v in padded.items()}

    def _reset_optimizer(self) -> None:
        # Each SPIN iteration is a fresh fine-tuning run from p_t, as in the official recipe.
        inner = self.optimizer
        while hasattr(inner, "optimizer"):
            inner = inner.optimizer
        inner.state.clear()

    def _update(self, loss: torch.Tensor, group: int) -> None:
        """Adds a micro batch's gradient to its optimizer step, taken at the boundary `train` set.
        Each of the step's `group` micro batches counts 1/group, as HF Trainer scales them: an
        epoch's last, smaller step is a mean like the others, not group/grad_accum of one (so
        DeepSpeed's own 1/grad_accum is off)."""
        self.engine.backward(loss / group, scale_wrt_gas=False)
        self.engine.step()

    def step_batch(self, rows: dict[str, Any], group: int = 1) -> dict[str, float]:
        """One micro batch of pairs, one of the `group` in its optimizer step: real and generated
        in one forward pass."""
        if self.cfg.spin.objective == "sft":
            return self.sft_step(rows, group)
        n = len(rows["prompt_ids"])
        batch = self._batch(rows["prompt_ids"] * 2, rows["real_ids"] + rows["generated_ids"])
        if self.reference is not None:
            ref_tokens = self._reference_logps(batch)
            self._compare_engines(rows, ref_tokens[n:], batch)
            ref = ref_tokens.sum(-1)
            ref_real, ref_generated = ref[:n], ref[n:]
        else:
            ref_real = torch.as_tensor(rows["ref_real_logps"], dtype=torch.float32, device=self.engine.device)
            ref_generated = torch.as_tensor(rows["ref_generated_logps"], dtype=torch.float32, device=self.engine.device)
        policy_tokens = self._logps(self.engine, batch)
        if self.reference is None and self.engine.global_steps == self.first_step:  # the policy is still p_{t-1}
            self._compare_engines(rows, policy_tokens[n:], batch)
        policy = policy_tokens.sum(-1)
        losses, real_rewards, generated_rewards = spin_loss(
            policy[:n], policy[n:], ref_real, ref_generated, self.cfg.spin.beta, self.cfg.spin.loss_type
        )
        self._update(losses.mean(), group)
        identical = torch.tensor(
            [list(r) == list(g) for r, g in zip(rows["real_ids"], rows["generated_ids"], strict=True)]
        )
        lengths = batch["response_mask"].sum(-1).split(n)
        return spin_metrics(losses, real_rewards, generated_rewards, policy[:n], policy[n:], identical, lengths)

    def sft_step(self, rows: dict[str, Any], group: int = 1) -> dict[str, float]:
        """One micro batch of the baseline: the real answers only, no reference."""
        batch = self._batch(rows["prompt_ids"], rows["real_ids"])
        logps = self._logps(self.engine, batch).sum(-1)
        loss = sft_loss(logps, batch["response_mask"][:, 1:].sum(-1))
        self._update(loss, group)
        return {"loss": loss.item(), "logps/real": logps.detach().mean().item(), "pairs": float(len(logps))}

    def _mean_over_ranks(self, metrics: list[dict[str, float]]) -> dict[str, float]:
        """The batches' means as one mean over all their pairs, every rank's (the last batch of an
        iteration is smaller); `pairs` is how many."""
        keys = sorted(k for k in metrics[0] if k != "pairs")
        rows = [[m[k] * m["pairs"] for k in keys] + [m["pairs"]] for m in metrics]
        total = torch.tensor(rows, device=self.engine.device).sum(0)  # on it: NCCL reduces only GPU tensors
        torch.distributed.all_reduce(total)
        return dict(zip(keys, (total[:-1] / total[-1]).tolist(), strict=True)) | {"pairs": total[-1].item()}

    def train(self, iteration: int, rows_per_rank: int) -> Trained:
        """Trains p_t from p_{t-1} on the batches fed to this rank (train.epochs passes over its
        `rows_per_rank` pairs); returns the log lines (rank-averaged)."""
        self._expect(iteration - 1, f"training iteration {iteration}")
        t = self.cfg.train
        if self.reference is not None:
            self._refresh_reference()
        self._reset_optimizer()
        self.mismatch = torch.zeros(3, dtype=torch.float64)
        self.first_step = self.engine.global_steps
        per_epoch = math.ceil(rows_per_rank / t.batch_size)
        plan = accumulation(per_epoch, t.epochs, t.grad_accum)
        micro_steps, total_steps = len(plan), sum(at.last for at in plan)
        start = time.perf_counter()
        logs, window = [], []
        for micro, (at, rows) in enumerate(zip(plan, self.fed_batches(micro_steps), strict=True), start=1):
            lr = lr_at(at.step, total_steps, t.lr, t.warmup_ratio, t.schedule)
            for param_group in self.optimizer.param_groups:
                param_group["lr"] = lr
            # Set on every micro batch: DeepSpeed would otherwise step by its job-wide micro count.
            self.engine.set_gradient_accumulation_boundary(at.last)
            window.append(self.step_batch(rows, at.group))
            self.beat(
                f"training iteration {iteration}, micro-batch {micro}/{micro_steps}",
                (at.step + int(at.last), total_steps),
            )
            if micro % t.log_every == 0 or micro == micro_steps:
                line = {"iteration": iteration, "step": micro, "epoch": (micro - 1) // per_epoch, "lr": lr}
                line |= self._mean_over_ranks(window)
                window = []
                logs.append(line)
                if self.rank == 0:
                    shown = line | distinct_only([line])
                    shown = " ".join(f"{k} {v:.4f}" for k, v in shown.items() if "/" in k or k == "loss")
                    print(f"[train] iteration {iteration} micro-batch {micro}/{micro_steps} {shown}", flush=True)
        self.holds = iteration
        return Trained(logs, time.perf_counter() - start, micro_steps, os.getpid(), self._mismatch_over_ranks())

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

    def export(self, iteration: int, model_dir: str, pack_weights: bool) -> ray.ObjectRef | None:
        """p_t as a HF checkpoint (rank 0) and, for the engines' object-store path, the packed weights.

        The checkpoint is all a restart needs: each iteration starts a fresh optimizer from p_t,
        so optimizer state is never carried across iterations and is not saved."""
        self._expect(iteration, f"exporting {model_dir}")
        lora = self.cfg.train.lora
        if lora:  # the adapter only: the base weights never change
            state = adapter_state(self.engine.module, self.cfg.train.zero_stage == 3)
        elif self.cfg.train.zero_stage == 3:
            state = zero3_full_state_dict(self.engine)
        else:
            state = self.engine.module.state_dict()
        if self.rank:
            return None
        state = {k: v.detach().cpu() for k, v in state.items()}
        final = Path(model_dir)
        tmp = final.with_name(final.name + ".tmp")
        self.engine.module.save_pretrained(tmp, state_dict=state)  # a LoRA run's: PEFT's adapter files
        self.tokenizer.save_pretrained(tmp)
        replace_dir(tmp, final)  # over any final left by an export whose reply a restart lost
        self.exported(str(final), iteration)
        if not pack_weights:
            return None
        return ray.put(adapter_files(final) if lora else pack(state))

    def weight_specs(self) -> list[Spec]:
        """(name, full shape, dtype) of every parameter; tied weights appear once."""
        return [
            (name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
            for name, p in self.engine.module.named_parameters()
        ]

    def weight_address(self) -> tuple[str, int] | None:
        """Rank 0 hosts the weight-sync group's rendezvous: a fresh port for every (re)connect."""
        return free_address() if self.rank == 0 else None

    def join_weight_group(self, master: str, port: int, world_size: int, timeout_s: float) -> None:
        self.weight_group = weight_group(master, port, self.rank, world_size, timeout_s)

    def broadcast_weights(self, iteration: int, plan: list[list[Spec]]) -> None:
        """Every rank sends its own part of p_t's each bucket (under ZeRO-3: its own partition)."""
        self._expect(iteration, "the weight sync")
        try:
            send_buckets(self.weight_group, plan, dict(self.engine.module.named_parameters()), self.world_size)
        except Exception:
            self.weight_group = None  # dropping it closes the sockets, so no engine waits for the rest
            raise


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
    model_path, holds = ray.get(channel.hello.remote(rank, here))
    worker = SpinWorker(cfg, model_path, holds)
    worker.beat = lambda what, steps=None: channel.beat.remote(rank, what, steps)
    worker.next_batch = lambda: channel.next_batch.remote(rank)
    worker.exported = lambda path, t: ray.get(channel.set_model_path.remote(path, t))
    worker.beat("ready")
    while True:
        task = ray.get(channel.next_task.remote(rank))
        if task.method is None:
            return
        name = task.method.__name__
        print(f"[train] rank {rank} runs {name} (task {task.id})", flush=True)
        try:
            result = task.method(worker, **task.kwargs)
        except Exception as e:  # noqa: BLE001 - reported to the coordinator, which decides what to do
            frames = traceback.extract_tb(e.__traceback__)
            in_collective = any(f"torch{os.sep}distributed{os.sep}" in frame.filename for frame in frames[-3:])
            result = Failure(f"rank {rank} failed in {name}:\n{traceback.format_exc()}", in_collective)
        ray.get(channel.reply.remote(rank, task.id, result))
        # The reply's ObjectRef (a packed p_t) reaches the coordinator as bytes: the store's copy
        # must not stay pinned here until the next task, the whole of iteration t+1.
        del result
