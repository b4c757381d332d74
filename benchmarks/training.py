"""Training benchmark: step time inside the Ray Train loop vs a plain single-process DeepSpeed loop.

Both sides run `spin_ray.trainer.worker.SpinWorker.step_batch` on the same micro batches of the same
model (fp32, ZeRO-2, 1 rank, 1 thread), so the ratio is what Ray Train + Ray Data add per step.
Goal: the Ray Train loop costs <= 5% over plain DeepSpeed per step.

The two sides stay up side by side and take turns, one iteration each per round; each is idle while
the other runs. Machine speed here drifts by ~10% within minutes, so only ratios of neighbouring
iterations are trusted: the overhead is the median of the per-round ratios.

Where a CUDA GPU is at hand the plain loop also runs a ~0.5B Qwen2.5-shaped Llama in bf16 there and
prints tokens/s and model FLOPs utilization (MFU).

    python benchmarks/training.py               # plain loop vs Ray Train; needs ray
    python benchmarks/training.py --plain-only  # plain loop(s) only: runs where ray is not installed

Each plain loop lives in its own spawned process: DeepSpeed picks its accelerator once per process,
and the plain loop's thread shares no process with Ray's driver.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from models import make_llama

# CPU model and batches: a step takes a few hundred ms on one thread, so per-step overhead of
# milliseconds is visible, and the whole run stays within a few minutes.
CPU_MODEL = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=4)
CPU_PAIRS, CPU_BATCH = 128, 8  # 16 steps per iteration, ~7 s
# GPU model: the shape of Qwen2.5-0.5B (494M parameters, tied embeddings) as a Llama.
GPU_MODEL = dict(
    hidden_size=896,
    num_hidden_layers=24,
    intermediate_size=4864,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
)
GPU_PAIRS, GPU_BATCH, GPU_PROMPT, GPU_RESPONSE = 160, 8, 256, 256  # 20 steps of 8 pairs x 512 tokens x 2
# Dense bf16 peak FLOP/s by device name (no sparsity), for MFU.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def make_pairs(n: int, vocab: int, prompt: tuple[int, int], response: tuple[int, int], seed: int = 0) -> pa.Table:
    """Random SPIN pairs with the job's columns; lengths drawn from [lo, hi] (fixed if lo == hi)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[list[int]]:
        lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
        return [torch.randint(7, vocab, (k,), generator=g).tolist() for k in lengths]  # 7: skip special tokens

    return pa.table(
        {
            "uid": [f"u{i}" for i in range(n)],
            "prompt_ids": ids(*prompt),
            "real_ids": ids(*response),
            "generated_ids": ids(*response),
        }
    )


def import_spin_worker() -> tuple[Any, Any]:
    """SpinWorker without Ray: spin_ray.trainer imports ray at module level for its Ray Train half
    (Channel, worker_loop), which the plain loop never touches. Where ray is not installed (the GPU
    box), a stand-in module lets the import succeed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        import importlib.machinery
        import sys
        import types

        stub = types.ModuleType("ray")
        stub.__spec__ = importlib.machinery.ModuleSpec("ray", None)
        stub.remote = lambda **_: lambda cls: cls  # for `@ray.remote(num_cpus=0) class Channel`
        sys.modules["ray"] = stub
    from spin_ray.trainer.ds import lr_at
    from spin_ray.trainer.worker import SpinWorker

    return SpinWorker, lr_at


class PlainLoop:
    """A single-process DeepSpeed loop over `pairs`: SpinWorker.train without Ray.

    Same order of work as SpinWorker.train: reference refresh and optimizer reset before the clock
    starts, then per step the lr schedule and step_batch on the same micro batches, in order.
    """

    def __init__(self, model_dir: Path, pairs: pa.Table, overrides: list[str]):
        from spin_ray.config import load_config

        self.cfg = load_config(None, overrides)
        self.on_gpu = self.cfg.train.use_gpu
        if not self.on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as worker_loop does; before deepspeed is imported
            torch.set_num_threads(1)  # = train.num_cpus, as the Ray Train worker sets
        with socket.socket() as s:  # a free port for this process' own world of one
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}
        os.environ["LOCAL_RANK"] = "0"
        torch.distributed.init_process_group("nccl" if self.on_gpu else "gloo")
        SpinWorker, self.lr_at = import_spin_worker()
        self.worker = SpinWorker(self.cfg, str(model_dir))
        bs = self.cfg.train.batch_size
        self.batches = [pairs.slice(i, bs).to_pydict() for i in range(0, pairs.num_rows, bs)]

    def iteration(self) -> float:
        """One pass over the pairs; returns seconds per step."""
        t, w = self.cfg.train, self.worker
        w._refresh_reference()
        w._reset_optimizer()
        if self.on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for step, rows in enumerate(self.batches):
            for group in w.optimizer.param_groups:
                group["lr"] = self.lr_at(step, len(self.batches), t.lr, t.warmup_ratio, t.schedule)
            w.step_batch(rows)  # ends in .item() calls: the GPU has finished the step
        return (time.perf_counter() - start) / len(self.batches)


def cpu_overrides(out_dir: Path) -> list[str]:
    return [
        f"run.output_dir={out_dir}",
        "train.num_workers=1",
        "train.num_cpus=1",
        f"train.batch_size={CPU_BATCH}",
        "train.zero_stage=2",
        f"train.log_every={CPU_PAIRS // CPU_BATCH}",  # one log line (one all_reduce) per iteration
        "model.dtype=float32",
    ]


def build_loop(part: str, root: Path) -> tuple[PlainLoop, dict[str, Any]]:
    """The plain loop of a part, and facts about it: "cpu" on the model and pairs the parent built
    under root; "gpu" on a ~0.5B model in bf16, built here."""
    if part == "cpu":
        return PlainLoop(root / "model", pq.read_table(root / "pairs.parquet"), cpu_overrides(root / "plain")), {}
    params = make_llama(root / "model-gpu", **GPU_MODEL)
    pairs = make_pairs(GPU_PAIRS, GPU_MODEL["vocab_size"], (GPU_PROMPT,) * 2, (GPU_RESPONSE,) * 2)
    overrides = [
        f"run.output_dir={root / 'plain-gpu'}",
        "train.use_gpu=true",
        f"train.batch_size={GPU_BATCH}",
        "train.zero_stage=2",
        "model.dtype=bfloat16",
    ]
    return PlainLoop(root / "model-gpu", pairs, overrides), {"params": params, "device": torch.cuda.get_device_name()}


def plain_server(conn: Connection, part: str, root: Path) -> None:
    """Child process: builds one plain loop, then runs as many iterations as asked, until None."""
    with open(root / f"{part}.log", "w") as log:  # DeepSpeed's chatter goes to a log, not the table
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        loop, info = build_loop(part, root)
        conn.send(("ok", info))
        while (iterations := conn.recv()) is not None:
            conn.send(("ok", [loop.iteration() for _ in range(iterations)]))
        torch.distributed.destroy_process_group()
    except Exception:
        conn.send(("error", traceback.format_exc()))


class PlainProcess:
    """Driver-side handle of a plain loop in a fresh (spawned) process."""

    def __init__(self, part: str, root: Path):
        self.part, self.root = part, root
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=plain_server, args=(child, part, root), daemon=True)
        self.process.start()
        self.info: dict[str, Any] = self._reply()

    def run(self, iterations: int) -> list[float]:
        """Seconds per step of each of `iterations` passes over the pairs."""
        self.conn.send(iterations)
        return self._reply()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=60)

    def _reply(self) -> Any:
        try:
            status, value = self.conn.recv()
        except EOFError:  # the child died without a word (killed, segfault)
            self.process.join(timeout=5)
            status, value = "error", f"exit code {self.process.exitcode}"
        if status == "error":
            log = (self.root / f"{self.part}.log").read_text().splitlines()[-30:]
            raise RuntimeError(f"plain {self.part} loop failed: {value}\nlast lines of its log:\n" + "\n".join(log))
        return value


class RayTrainLoop:
    """Driver-side handle of the job's trainer (Ray Train + DeepSpeed, 1 worker) on the same pairs."""

    def __init__(self, root: Path, overrides: list[str] | None = None, model_dir: Path | None = None, config=None):
        """root/pairs.parquet and root/model, with `cpu_overrides` unless a config file or other
        overrides are given."""
        import ray

        from spin_ray.cluster import workers_not_niced
        from spin_ray.config import load_config
        from spin_ray.pairs import pair_stream
        from spin_ray.trainer.supervisor import Trainer

        workers_not_niced()  # as jobs/spin.py starts its local Ray
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        stored = root / "pairs"  # the pairs as an iteration's parquet part, streamed as the job does
        stored.mkdir(exist_ok=True)
        pq.write_table(pq.read_table(root / "pairs.parquet"), stored / "part-000000.parquet")
        cfg = load_config(config, overrides or cpu_overrides(root / "ray"))
        self.pairs = pair_stream([stored], None, 0, 256, cfg.train.batch_size)
        start = time.perf_counter()
        self.trainer = Trainer(cfg, str(model_dir or root / "model"))
        self.trainer.wait_ready()
        self.startup = time.perf_counter() - start
        self.iterations = 1  # the next iteration t: the ranks hold p_0
        self.outside: list[float] = []  # seconds per Trainer.train() not spent in the loop

    def run(self, iterations: int) -> list[float]:
        per_step = []
        for _ in range(iterations):
            start = time.perf_counter()
            result = self.trainer.train(self.iterations, self.pairs)
            # The loop's own clock vs the driver's: the rest is count/split/hand-over per iteration.
            self.outside.append(time.perf_counter() - start - result.seconds)
            per_step.append(result.seconds / result.steps)
            self.iterations += 1
        return per_step

    def close(self) -> None:
        import ray

        self.trainer.stop()
        ray.shutdown()


def print_gpu(info: dict[str, Any], per_step: list[float]) -> None:
    """tokens/s and MFU of the GPU plain loop's best warm iteration."""
    print(f"\nGPU, plain DeepSpeed loop, bf16 ZeRO-2: {info['device']}, {info['params'] / 1e6:.0f}M params")
    print(f"  {GPU_BATCH} pairs x {GPU_PROMPT}+{GPU_RESPONSE} tokens per step, policy fwd+bwd and reference fwd")
    print("  s/step per iteration: " + ", ".join(f"{s:.3f}" for s in per_step))
    # Every step trains on 2 x batch sequences (real and generated) of prompt + response tokens.
    tokens_per_s = 2 * GPU_BATCH * (GPU_PROMPT + GPU_RESPONSE) / min(per_step[1:] or per_step)
    print(f"  {tokens_per_s:,.0f} tokens/s")
    model_flops = 6 * info["params"] * tokens_per_s  # policy fwd+bwd; the reference adds 2N more
    peak = next((flops for key, flops in PEAK_BF16.items() if key in info["device"]), None)
    if peak:
        mfu = model_flops / peak
        print(f"  MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s dense bf16 (6N per token; {8 / 6 * mfu:.1%} if the")
        print("  reference forward is counted too, as 2N)")
    else:
        print(f"  {model_flops / 1e12:.0f} TFLOP/s of model FLOPs (6N); MFU: peak of this device unknown")


def benchmark(args: argparse.Namespace, root: Path) -> None:
    params = make_llama(root / "model", **CPU_MODEL)
    vocab = 104  # the toy tokenizer's
    pq.write_table(make_pairs(CPU_PAIRS, vocab, prompt=(16, 48), response=(8, 48)), root / "pairs.parquet")
    print(
        f"CPU: {params / 1e6:.1f}M-param Llama, fp32, ZeRO-2, 1 rank, 1 thread; {CPU_PAIRS} pairs (prompts 16-48, "
        f"responses 8-48 tokens) in {CPU_PAIRS // CPU_BATCH} steps of {CPU_BATCH} pairs, policy + reference model",
        flush=True,
    )
    plain = PlainProcess("cpu", root)
    if args.plain_only:
        per_step = plain.run(args.rounds)
        print("plain DeepSpeed s/step per iteration (first = warm-up): " + ", ".join(f"{s:.3f}" for s in per_step))
    else:
        ray_loop = RayTrainLoop(root)
        print(f"\n{'round':>6} | {'plain s/step':>12} | {'Ray Train s/step':>16} | {'ratio':>6}")
        ratios, plain_warm, ray_warm = [], [], []
        for r in range(args.rounds):
            (p,), (q,) = plain.run(1), ray_loop.run(1)
            note = " (warm-up)" if r == 0 else ""
            print(f"{r:>6} | {p:>12.3f} | {q:>16.3f} | {q / p:>6.3f}{note}", flush=True)
            if r > 0:
                ratios.append(q / p)
                plain_warm.append(p)
                ray_warm.append(q)
        print(
            f"{'median':>6} | {statistics.median(plain_warm):>12.3f} | {statistics.median(ray_warm):>16.3f} | "
            f"{statistics.median(ratios):>6.3f}"
        )
        print(
            f"Ray Train loop overhead per step: {statistics.median(ratios) - 1:+.1%} (median of the per-round "
            f"ratios, spread {min(ratios) - 1:+.1%} to {max(ratios) - 1:+.1%}; goal <= +5%)"
        )
        print(
            "outside the loop, per Trainer.train() (stream, hand-over): "
            f"{', '.join(f'{s:.2f}' for s in ray_loop.outside)} s; Trainer start-up {ray_loop.startup:.1f} s"
        )
        ray_loop.close()
    plain.close()

    if torch.cuda.is_available():
        gpu = PlainProcess("gpu", root)
        print_gpu(gpu.info, gpu.run(args.rounds))
        gpu.close()
    else:
        print("\nGPU part skipped: no CUDA device here")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plain-only", action="store_true", help="skip the Ray Train side (no ray needed)")
    ap.add_argument("--rounds", type=int, default=7, help="iterations per side; the first is warm-up")
    args = ap.parse_args()
    t_start = time.perf_counter()
    # Inherited by the plain loop's process and Ray's workers: one OpenMP thread from their start, as
    # the Ray Train worker has with train.num_cpus=1 (more threads than cores ran many times slower).
    os.environ["OMP_NUM_THREADS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="spin-bench-train-") as root:
        benchmark(args, Path(root))
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
