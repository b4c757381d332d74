"""LoRA benchmark: what an adapter saves against full fine-tuning, and that the toy learns with one.

1. Training, per rank: peak RSS and seconds per SPIN step of `SpinWorker` (fp32, ZeRO-2, 1 rank,
   1 thread) on a ~100M-parameter random Llama, full fine-tuning vs LoRA r=16 on every linear
   layer. Each side runs in a fresh spawned process, so its peak RSS is its own.
2. Weight sync, per engine: bytes and seconds of the object-store hot-swap into a running engine
   (`Engine.load_weights`), the whole model vs the adapter (median of --swaps).
3. The toy job with LoRA (jobs/spin.py, the embedded default + TOY_LORA): held-out greedy
   accuracy and log p(y|x) of p_0 and after each iteration.

    python benchmarks/lora.py                      # ~20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from models import make_llama, start_engines
from training import PlainLoop, make_pairs

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(hidden_size=768, num_hidden_layers=14, intermediate_size=2048, num_attention_heads=12)  # ~99M
LORA = ["train.lora.r=16", "train.lora.alpha=32"]
TOY_LORA = ["train.lora.r=16", "train.lr=3e-5"]  # the toy's full fine-tuning lr x 3 (1e-4 fell back by iteration 3)


def train_side(model_dir: Path, pairs_path: Path, overrides: list[str], iterations: int) -> dict[str, Any]:
    """Child process: the plain loop of benchmarks/training.py; seconds per step of the last
    iteration (the first warms up) and this process' peak RSS."""
    loop = PlainLoop(model_dir, pq.read_table(pairs_path), overrides)
    seconds = [loop.iteration() for _ in range(iterations)][-1]
    trainable = sum(p.numel() for p in loop.worker.engine.module.parameters() if p.requires_grad)
    return {
        "step_s": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": trainable,
    }


def training(root: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    pairs = make_pairs(args.pairs, 100, (args.tokens, args.tokens), (args.tokens, args.tokens))
    pq.write_table(pairs, root / "pairs.parquet")
    base = [
        "train.num_workers=1",
        "train.num_cpus=1",
        f"train.batch_size={args.batch}",
        "train.zero_stage=2",
        "train.optimizer=adamw",
        f"train.log_every={args.pairs // args.batch}",
        "model.dtype=float32",
    ]
    results = {}
    ctx = multiprocessing.get_context("spawn")
    for name, extra in (("full", []), ("lora", LORA)):
        overrides = [f"run.output_dir={root / name}", *base, *extra]
        with ctx.Pool(1) as pool:  # a fresh process per side: its peak RSS is its own
            results[name] = pool.apply(train_side, (root / "model", root / "pairs.parquet", overrides, 2))
    return results


def adapter_payload(model_dir: Path, out: Path) -> dict[str, bytes]:
    """A PEFT adapter (r=16, all linear layers, B not 0) of the model, as the trainer exports it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from spin_ray.config import load_config
    from spin_ray.lora import adapter_files, peft_config

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), peft_config(load_config(None, LORA).train.lora)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.save_pretrained(out)
    return adapter_files(out)


def sync(root: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Object-store swaps into one running engine: the whole model, then (another engine, LoRA
    enabled) the adapter. Seconds from the driver's call to the engine's reply, payload in the store."""
    import ray
    from transformers import AutoModelForCausalLM

    from spin_ray.config import load_config
    from spin_ray.weights import pack

    results = {}
    full = pack(AutoModelForCausalLM.from_pretrained(root / "model").state_dict())
    payloads = {"full": (full, []), "lora": (adapter_payload(root / "model", root / "adapter"), LORA)}
    for name, (payload, extra) in payloads.items():
        generation = load_config(None, ["generation.kv_cache_gib=0.25", *extra]).generation
        engines = start_engines(root / "model", generation, 256)
        try:
            engine, ref = engines.all()[0], ray.put(payload)
            seconds = []
            for _ in range(args.swaps):
                tick = time.perf_counter()
                report = ray.get(engine.load_weights.remote(ref, None))
                seconds.append(time.perf_counter() - tick)
            results[name] = {"bytes": report["bytes"], "seconds": statistics.median(seconds)}
        finally:
            engines.shutdown()
    return results


def toy(root: Path, args: argparse.Namespace) -> list[tuple[float, float]]:
    """The embedded toy job with LoRA; held-out (accuracy, log p(y|x)) of p_0, p_1, ..."""
    out = root / "toy-lora"
    command = [sys.executable, str(ROOT / "jobs" / "spin.py"), *TOY_LORA, f"run.output_dir={out}"]
    command += [f"spin.iterations={args.toy_iterations}", "run.wandb_mode=disabled"]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = sorted((r for r in rows if "eval/accuracy" in r), key=lambda r: r["iteration"])
    return [(r["eval/accuracy"], r["eval/logps/real"]) for r in evaluated]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"], help="of the ~100M Llama")
    parser.add_argument("--pairs", type=int, default=32, help="pairs per training iteration")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--tokens", type=int, default=64, help="prompt and response length")
    parser.add_argument("--swaps", type=int, default=5, help="weight swaps per side")
    parser.add_argument("--toy-iterations", type=int, default=3)
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = make_llama(root / "model", **MODEL | {"num_hidden_layers": args.layers})
        train = training(root, args)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            swaps = sync(root, args)
        finally:
            ray.shutdown()
        accuracy = toy(root, args)

    full, lora = train["full"], train["lora"]
    print(f"model: random Llama, {params:,} parameters ({args.layers} layers, hidden {MODEL['hidden_size']}), fp32")
    print(f"training (1 rank, ZeRO-2, AdamW, {args.batch} pairs x 2 x {2 * args.tokens} tokens per step):")
    print(f"  {'':6}{'trainable':>14}{'peak RSS':>12}{'s/step':>9}")
    for name, r in train.items():
        print(f"  {name:6}{r['trainable']:>14,}{r['peak_rss_mb']:>9.0f} MB{r['step_s']:>9.3f}")
    rss, step = lora["peak_rss_mb"] / full["peak_rss_mb"], lora["step_s"] / full["step_s"]
    print(f"  LoRA/full: RSS {rss:.2f}, step time {step:.2f}")
    print("weight sync into one engine (object store, median):")
    for name, r in swaps.items():
        print(f"  {name:6}{r['bytes'] / 2**20:>10.2f} MiB {r['seconds']:>8.3f} s")
    nbytes, seconds = (swaps["lora"][k] / swaps["full"][k] for k in ("bytes", "seconds"))
    print(f"  LoRA/full: bytes {nbytes:.4f}, seconds {seconds:.2f}")
    print(f"toy job with LoRA ({' '.join(TOY_LORA)}), held-out, p_0 -> p_{len(accuracy) - 1}:")
    print("  greedy accuracy " + " -> ".join(f"{a:.3f}" for a, _ in accuracy))
    print("  log p(y|x)      " + " -> ".join(f"{lp:.3f}" for _, lp in accuracy))


if __name__ == "__main__":
    main()
