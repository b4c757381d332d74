"""Speed on a real chat model: SmolLM2-135M-Instruct (spin_ray.smollm2) with configs/smollm2.yaml's
settings, threads included. Each part prints its ratio against a plain baseline run in the same
process (or a child of it), on the same prompts, pairs and settings:

    python benchmarks/real_model.py generation   # the engine actor (Ray Data) vs plain vllm.LLM.generate
    python benchmarks/real_model.py training     # a SPIN step in Ray Train + DeepSpeed vs a plain PyTorch /
                                                 # PEFT loop, LoRA and full fine-tuning
    python benchmarks/real_model.py job          # jobs/spin.py vs plain generation + plain training of the
                                                 # same iterations in one process
    python benchmarks/real_model.py job spin.iterations=1 data.max_examples=8    # overrides: every part

`benchmarks/iteration.py official --config configs/smollm2.yaml` times the official per-step workflow.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "smollm2.yaml"
sys.path.insert(0, str(ROOT / "benchmarks"))


def config(*overrides: str):  # noqa: ANN201 - spin_ray.config.Config, imported late (threads first)
    from spin_ray.config import load_config

    return load_config(CONFIG, ["run.wandb_mode=disabled", *overrides])


# Threads are fixed when torch is imported: this process runs the plain vLLM (as many as an engine
# has) and its children the plain training (as many as a train rank has).
os.environ["OMP_NUM_THREADS"] = str(max(1, int(config().generation.num_cpus)))

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402
from typing import Any  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from generation import local_engine, plain_run, stream_run  # noqa: E402
from models import start_engines  # noqa: E402

from spin_ray.data import pad_pairs  # noqa: E402
from spin_ray.driver.prepare import prepare  # noqa: E402
from spin_ray.loss import spin_loss, token_logps  # noqa: E402


def prompts(cfg: Any, n: int) -> tuple[Any, pa.Table]:
    """The task's first n training prompts as the job's engine rows (ids, per-row seeds)."""
    from spin_ray.loop.generate import sample_seed

    p = prepare(cfg)
    table = pq.read_table(p.train.path).slice(0, n)
    seeds = [sample_seed(cfg.run.seed, 1, u) for u in table["uid"].to_pylist()]
    return p, table.append_column("seed", pa.array(seeds, pa.int64()))


def generation(tmp: Path, args: argparse.Namespace) -> None:
    import ray

    from spin_ray.cluster import workers_not_niced

    cfg = config(*args.overrides, f"run.output_dir={tmp / 'gen'}", f"data.max_examples={args.prompts}")
    p, rows = prompts(cfg, args.prompts)
    g = cfg.generation
    print(f"{rows.num_rows} prompts, <= {g.max_tokens} new tokens, temperature {g.temperature}, per-row seeds; ")
    print(f"1 engine actor ({g.num_cpus:g} CPU, as many threads) vs vllm.LLM in this process, same threads")
    workers_not_niced()  # as jobs/spin.py starts its local Ray
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    engines = start_engines(Path(p.model_path), g, p.max_model_len)
    local = local_engine(Path(p.model_path), g, p.max_model_len)
    plain_run(local, rows.slice(0, 16), g, 16)  # warm-up both
    stream_run(engines, rows.slice(0, 16), g, g.batch_size)
    ratios = []
    for r in range(args.rounds):  # one generates at a time; neighbours compared (machine speed drifts)
        plain_s, plain_tok = plain_run(local, rows, g, rows.num_rows)
        ours_s, ours_tok = stream_run(engines, rows, g, g.batch_size)
        ratios.append((ours_tok / ours_s) / (plain_tok / plain_s))
        print(
            f"  round {r}: plain {plain_tok / plain_s:.0f} tok/s, engines {ours_tok / ours_s:.0f} tok/s "
            f"({ours_tok} and {plain_tok} tokens): {ratios[-1]:.3f}x",
            flush=True,
        )
    local.shutdown()
    engines.shutdown()
    ray.shutdown()
    print(f"generation, engines / plain vLLM: {statistics.median(ratios):.3f}x tokens/s (goal >= 0.95x)")


# --- A plain PyTorch / PEFT SPIN loop: what a user would write without spin-ray ---------------------


def plain_model(model_dir: str, lora: Any) -> tuple[Any, Any]:
    """(policy, reference): with LoRA the reference is the policy with its adapter off (p_0's
    adapter is 0); else a frozen copy."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora is None:
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
        return policy.train(), reference
    from peft import LoraConfig, get_peft_model

    peft = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)
    policy = get_peft_model(policy, peft).train()
    return policy, None


def plain_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_logps(logits, batch["input_ids"], batch["response_mask"]).sum(-1)


def plain_step(policy: Any, reference: Any, optimizer: Any, rows: dict[str, list], beta: float, pad: int) -> float:
    """One SPIN step on a micro batch of pairs; returns the loss."""
    n = len(rows["prompt_ids"])
    batch = pad_pairs(rows["prompt_ids"] * 2, rows["real_ids"] + rows["generated_ids"], pad)
    with torch.no_grad():
        if reference is None:
            with policy.disable_adapter():
                ref = plain_logps(policy, batch)
        else:
            ref = plain_logps(reference, batch)
    policy_logps = plain_logps(policy, batch)
    losses, _, _ = spin_loss(policy_logps[:n], policy_logps[n:], ref[:n], ref[n:], beta, "sigmoid")
    loss = losses.mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def plain_training(conn: Connection, model_dir: str, overrides: list[str], pairs_path: str) -> None:
    """Child process: the plain loop over the pairs (in the job's batch order), an iteration per ask."""
    cfg = config(*overrides)
    torch.set_num_threads(max(1, int(cfg.train.num_cpus)))
    policy, reference = plain_model(model_dir, cfg.train.lora)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batches = job_order(Path(pairs_path), cfg.train.batch_size)
    conn.send("ready")
    while conn.recv():
        start = time.perf_counter()
        for rows in batches:
            plain_step(policy, reference, optimizer, rows, cfg.spin.beta, 0)
        conn.send((time.perf_counter() - start) / len(batches))


def job_order(stored: Path, batch_size: int) -> list[dict[str, list]]:
    """The micro batches the job's trainer gets from the pairs in `stored` (RayTrainLoop's stream)."""
    from spin_ray.pairs import pair_stream

    return [step[0].to_pydict() for step in pair_stream([stored], None, 0, 256, batch_size).steps(1)]


def training(tmp: Path, args: argparse.Namespace) -> None:
    from training import RayTrainLoop

    cfg = config(*args.overrides, f"run.output_dir={tmp / 'train'}", f"data.max_examples={args.pairs}")
    p, rows = prompts(cfg, args.pairs)
    # y' is the next prompt's real answer: lengths as real ones, and every pair distinct.
    generated = rows["real_ids"].to_pylist()[1:] + rows["real_ids"].to_pylist()[:1]
    pairs = pa.table(
        {"uid": rows["uid"], "prompt_ids": rows["prompt_ids"], "real_ids": rows["real_ids"], "generated_ids": generated}
    )
    for lora in (True, False):
        side = tmp / ("lora" if lora else "full")
        side.mkdir()
        pq.write_table(pairs, side / "pairs.parquet")
        overrides = [*args.overrides, f"run.output_dir={side / 'out'}", "run.wandb_mode=disabled"]
        overrides += ["train.log_every=1000"]
        overrides += [] if lora else ["train.lora=null"]
        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe()
        plain = ctx.Process(
            target=plain_training, args=(child, p.model_path, overrides, str(side / "pairs")), daemon=True
        )
        ours = RayTrainLoop(side, overrides, Path(p.model_path), CONFIG)
        plain.start()
        assert conn.recv() == "ready"
        ratios = []
        for r in range(args.rounds + 1):  # round 0 warms both up
            conn.send(True)
            plain_s = conn.recv()
            (ours_s,) = ours.run(1)
            print(
                f"  {side.name} round {r}: plain {plain_s:.2f} s/step, Ray Train + DeepSpeed {ours_s:.2f} s/step"
                + (" (warm-up)" if r == 0 else ""),
                flush=True,
            )
            if r:
                ratios.append(ours_s / plain_s)
        conn.send(False)
        plain.join(timeout=60)
        ours.close()
        print(f"training, {side.name}: ours / plain per step {statistics.median(ratios):.3f}x (goal <= 1.05x)")


def job(tmp: Path, args: argparse.Namespace) -> None:
    """The job as a user runs it (its own process, a local Ray) against the same work done plainly,
    also from a fresh process: start-ups, generation, training and the weight handover included.
    Neither evaluates (the held-out set is left out of both)."""
    from spin_ray.smollm2 import smollm2_world

    world = smollm2_world(0)
    same = [*args.overrides, f"model.path={world.model_dir}", f"data.train_path={world.train_path}"]
    start = time.time()
    plain = subprocess.run(
        [sys.executable, __file__, "_plain_job", str(tmp / "plain"), *same], check=True, capture_output=True, text=True
    )
    plain_s = time.time() - start
    print("plain, seconds: " + plain.stdout.strip().splitlines()[-1])
    start = time.time()
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "spin.py"),
            "--config",
            str(CONFIG),
            f"run.output_dir={tmp / 'job'}",
            "run.wandb_mode=disabled",
            *same,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ours_s = time.time() - start
    marks = json.loads((tmp / "job" / "summary.json").read_text())["startup_s"]
    print(
        "jobs/spin.py, seconds after launch: "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(marks.items(), key=lambda kv: kv[1]))
    )
    print(f"plain generation + training: {plain_s:.1f} s; jobs/spin.py: {ours_s:.1f} s")
    print(f"job / plain: {ours_s / plain_s:.3f}x (goal <= 1.0x)")


def plain_job(out: Path, overrides: list[str]) -> None:
    """The SPIN iterations of the config in one process, as a user would without spin-ray: vllm.LLM
    generates y' (with the adapter of p_{t-1} as a LoRARequest), then the plain loop trains p_t on
    the pairs of t and t - 1 and saves its adapter. Its reference is the base model in every
    iteration (the adapter off), not p_{t-1}: the same compute per step, so the timing holds, but
    these are not SPIN's weights after iteration 1."""
    from iteration import sampling
    from vllm import LLM, TokensPrompt
    from vllm.lora.request import LoRARequest

    from spin_ray.chat import model_stop_ids

    start = time.time()
    cfg = config(f"run.output_dir={out}", *overrides)
    p = prepare(cfg)
    g, lora = cfg.generation, cfg.train.lora
    train = pq.read_table(p.train.path).to_pylist()
    llm = LLM(
        model=p.model_path,
        dtype="float32",
        max_model_len=p.max_model_len,
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=int(g.kv_cache_gib * 2**30),
        enable_lora=True,
        max_lora_rank=lora.r,
    )
    stops = model_stop_ids(llm.get_tokenizer(), p.model_path)
    policy, reference = plain_model(p.model_path, lora)
    optimizer = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=cfg.train.lr)
    pairs: list[list[dict]] = []
    seconds = {"ready": time.time() - start, "generate": [], "train": []}
    for t in range(1, cfg.spin.iterations + 1):
        tick = time.time()
        params = sampling(cfg, stops, t, train)
        adapter = LoRARequest(f"p{t - 1}", t - 1, str(out / f"p{t - 1}")) if t > 1 else None
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=e["prompt_ids"]) for e in train],
            params,
            lora_request=adapter,
            use_tqdm=False,
        )
        pairs.append([e | {"generated_ids": list(o.outputs[0].token_ids)} for e, o in zip(train, outs, strict=True)])
        seconds["generate"].append(round(time.time() - tick, 1))
        tick = time.time()
        mixed = [row for it in pairs[-1 - cfg.spin.mix_previous :] for row in it]
        order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(t)).tolist()
        for i in range(0, len(order), cfg.train.batch_size):
            batch = [mixed[j] for j in order[i : i + cfg.train.batch_size]]
            rows = {k: [b[k] for b in batch] for k in ("prompt_ids", "real_ids", "generated_ids")}
            plain_step(policy, reference, optimizer, rows, cfg.spin.beta, 0)
        optimizer.state.clear()
        policy.save_pretrained(out / f"p{t}")
        seconds["train"].append(round(time.time() - tick, 1))
    print(json.dumps(seconds | {"ready": round(seconds["ready"], 1)}))


def main(argv: list[str]) -> None:
    if argv and argv[0] == "_plain_job":
        return plain_job(Path(argv[1]), argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["generation", "training", "job"])
    parser.add_argument("--prompts", type=int, default=96, help="generation: prompts per run")
    parser.add_argument("--pairs", type=int, default=32, help="training: pairs per iteration")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds per side, after a warm-up")
    parser.add_argument("overrides", nargs="*", help="key.sub=value on configs/smollm2.yaml, both sides")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spin-bench-real-") as tmp:
        {"generation": generation, "training": training, "job": job}[args.what](Path(tmp), args)
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
