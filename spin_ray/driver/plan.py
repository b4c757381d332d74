"""The dry run: what a job would do and need, printed before anything starts.

`python jobs/spin.py --dry-run ...` runs `prepare()` (config, model config, tokenizer, data) and
then `dry_run()`, which prints the plan and exits in seconds: no engine, no trainer, no local Ray.
It reads this machine (CPUs, RAM, visible GPUs) or, when `run.ray_address` or `RAY_ADDRESS` names
a cluster, connects to it as a driver for its nodes and its autoscaler's node types. The model is
counted on the meta device from config.json alone: no weights are read.

Exit codes: 0 when every group places and every memory estimate fits; 1 when a group cannot be
placed or an estimate does not fit (each on a WARN line). Bad config, model or data exit with 2
before the plan (jobs/spin.py).
"""

from __future__ import annotations

import os

from spin_ray.cluster import ray_address
from spin_ray.config import Config
from spin_ray.driver.estimate import (
    Shape,
    engine_memory,
    longest_response,
    model_shape,
    schedule,
    sides,
    training_memory,
)
from spin_ray.driver.placement import (
    ASSUMED_GPU_GIB,
    Cluster,
    connected_cluster,
    groups,
    local_cluster,
    place,
    res,
    scale,
)
from spin_ray.stages import Prepared


def _size(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size / 10:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def plan(cfg: Config, prepared: Prepared, cluster: Cluster) -> tuple[list[str], list[str]]:
    """(the plan's lines, the problems that make the dry run fail)."""
    shape = model_shape(prepared.model_path, cfg.train.lora)
    problems: list[str] = []
    lines = _workload(cfg, prepared, shape) + _placement(cfg, cluster, problems)
    return lines + _memory(cfg, prepared, shape, cluster, problems), problems


def _workload(cfg: Config, prepared: Prepared, shape: Shape) -> list[str]:
    g, t = cfg.generation, cfg.train
    data = prepared.train
    prompts = data.records
    prompt_len = data.prompt_tokens / prompts
    real_len = sum(n * count for n, count in data.real_lengths.items()) / prompts
    # y' is estimated as long as y, within generation.max_tokens.
    generated_len = sum(min(n, g.max_tokens) * count for n, count in data.real_lengths.items()) / prompts
    row_len = prompt_len + real_len + (prompt_len + generated_len if sides(cfg) == 2 else 0)
    lines = [
        f"model        {shape.architecture}, {shape.params:,} parameters ({_count(shape.params)}), largest layer "
        f"{shape.largest_layer:,}, {cfg.model.dtype}",
        f"{'':13}hidden {shape.hidden}, {shape.layers} layers, {shape.kv_heads} KV heads x {shape.head_dim}, "
        f"vocab {shape.vocab}",
        f"data         {prompts:,} training prompts, {len(prepared.eval):,} held-out; mean prompt {prompt_len:.1f}, "
        f"real response {real_len:.1f} tokens",
        f"limits       prompt <= {cfg.data.max_prompt_tokens}, real answer <= {cfg.data.max_response_tokens}, y' <= "
        f"{g.max_tokens} new tokens; engines' context {prepared.max_model_len}",
        *(f"{'':13}{why}" for why in prepared.limits),
        f"iterations   {cfg.spin.iterations}; pairs of iteration t: prompts x (1 + min(t-1, {cfg.spin.mix_previous})), "
        f"{t.epochs} epoch(s)",
        f"batch        {t.batch_size * t.grad_accum * t.num_workers} pairs per optimizer step = {t.batch_size} "
        f"x {t.grad_accum} accum x {t.num_workers} workers",
    ]
    if t.lora:
        adapter = f"{shape.trainable:,} trainable (LoRA r={t.lora.r}): the adapter of {t.lora.target_modules}"
        lines.insert(2, f"{'':13}{adapter}")
    steps = schedule(cfg, prompts)
    runs: list[list] = []  # [first, last, iteration]: equal iterations are shown once
    for i, it in enumerate(steps, start=1):
        if runs and runs[-1][2] == it:
            runs[-1][1] = i
        else:
            runs.append([i, i, it])
    for first, last, it in runs:
        label = f"iter {first}" + (f"-{last}" if last > first else "")
        lines.append(
            f"  {label:<11}{it.pairs:,} pairs, {it.per_rank:,} per rank: {it.micro_steps} micro, "
            f"{it.optimizer_steps} optimizer steps; ~{_count(it.pairs * row_len)} tokens through the policy"
        )
    if cfg.spin.objective == "sft":
        lines.append("generate     nothing: spin.objective=sft trains on the real answers (engines evaluate only)")
    else:
        lines.append(
            f"generate     <= {prompts * g.max_tokens:,} tokens per iteration ({prompts:,} x {g.max_tokens}), "
            f"~{_count(prompts * generated_len)} at the real responses' mean length"
        )
    return lines


def _placement(cfg: Config, cluster: Cluster, problems: list[str]) -> list[str]:
    lines = ["cluster      " + cluster.where]
    wanted = groups(cfg)
    outcome = place(cluster, wanted)
    for group in wanted:
        placed, how = outcome[group.name]
        total = res(scale(group.bundle, group.count))
        lines.append(f"{group.name:<13}{group.count} x {res(group.bundle)} = {total}: {how}")
        if not placed:
            problems.append(f"{group.name} cannot be placed")
    return lines


def _memory(cfg: Config, prepared: Prepared, shape: Shape, cluster: Cluster, problems: list[str]) -> list[str]:
    """The memory block of the plan: training worker, engine, host RAM, in the order printed
    (one function so the block reads as it prints)."""
    g, t, d = cfg.generation, cfg.train, cfg.data
    gpu_gib = cluster.gpu_gib or ASSUMED_GPU_GIB
    lines = []
    if t.use_gpu or g.num_gpus:
        known = f"from {cluster.gpu_source}" if cluster.gpu_gib else "assumed (an H100 80GB): not known here"
        lines.append(f"GPU          {gpu_gib:.0f} GiB per GPU, {known}")

    train = training_memory(cfg, shape)
    total = sum(train.values())
    seq = d.max_prompt_tokens + longest_response(cfg)
    checkpointing = "gradient checkpointing" if t.gradient_checkpointing else "no gradient checkpointing"
    explain = {
        "model states": f"params, grads, {t.optimizer} states (DeepSpeed's ZeRO-{t.zero_stage} estimator)",
        "reference": ("the adapter of p_t, a copy" if t.lora else "frozen copy of p_t")
        + (", partitioned" if t.zero_stage == 3 else ", whole"),
        "base weights": "frozen, " + ("partitioned + one layer gathered" if t.zero_stage == 3 else "whole"),
        "adapter states": f"{_count(shape.trainable)} adapter params, grads, {t.optimizer} states",
        "activations": f"{sides(cfg)} x {t.batch_size} sequences x {seq} tokens, {checkpointing}",
        "logits": f"the same tokens x vocab {shape.vocab}",
    }
    device = "GPU" if t.use_gpu else "CPU"
    lines.append(
        f"memory       per training worker (ZeRO-{t.zero_stage}, {t.optimizer}, {cfg.model.dtype}) on {device}"
    )
    lines += [f"  {part:<13}{_size(size):>11}  {explain[part]}" for part, size in train.items()]
    verdict = ""
    if t.use_gpu:
        verdict = "OK"
        if total > gpu_gib * 2**30:
            verdict = f"WARN: does not fit on one {gpu_gib:.0f} GiB GPU"
            problems.append("training does not fit in GPU memory")
    lines.append(f"  {'total':<13}{_size(total):>11}  {verdict}".rstrip())

    engine = engine_memory(cfg, shape, gpu_gib)
    longest = prepared.max_model_len
    if g.num_gpus and engine.weights >= g.gpu_memory_utilization * gpu_gib * 2**30:
        verdict = f"WARN: weights exceed {g.gpu_memory_utilization:g} x {gpu_gib:.0f} GiB per GPU"
        problems.append("engine weights do not fit in GPU memory")
    elif engine.kv_tokens < longest:
        verdict = f"WARN: vLLM will not start, its KV cache holds less than one {longest}-token sequence"
        problems.append("engine KV cache is smaller than one sequence")
    else:
        verdict = "OK"
    where = (
        f"per GPU (TP {g.tensor_parallel_size}, {g.gpu_memory_utilization:g} of the GPU)"
        if g.num_gpus
        else f"in RAM per process (TP {g.tensor_parallel_size})"
    )
    batch = g.batch_size * (d.max_prompt_tokens + g.max_tokens)
    lines += [
        f"per engine   weights {_size(engine.weights)}, KV cache {_size(engine.kv_cache)} {where}",
        f"{'':13}KV cache: {engine.kv_tokens:,} tokens at {_size(engine.kv_token)} = "
        f"{engine.kv_tokens // longest:,} sequences of {longest} at once (a request of {g.batch_size} prompts "
        f"asks for up to {batch:,}): {verdict}",
    ]

    on_cpu = (0 if g.num_gpus else g.num_engines * (engine.weights + engine.kv_cache)) + (
        0 if t.use_gpu else t.num_workers * total
    )
    if cluster.host_gib is not None and on_cpu:
        verdict = "OK"
        if on_cpu > cluster.host_gib * 2**30:
            verdict = "WARN: does not fit"
            problems.append("the parts on CPU do not fit in this machine's RAM")
        lines.append(
            f"host RAM     {_size(on_cpu)} for the engines and workers on CPU, this machine has "
            f"{cluster.host_gib:.1f} GiB: {verdict}"
        )
    return lines


def dry_run(cfg: Config, prepared: Prepared) -> int:
    """Prints the plan; returns the exit code: 0 when everything places and fits, 1 otherwise."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else importing DeepSpeed warns that it found no GPU
    address = ray_address(cfg)
    cluster = connected_cluster(address) if address else local_cluster(cfg)
    lines, problems = plan(cfg, prepared, cluster)
    print(f"[plan] dry run of {prepared.model_path}: nothing was started", *lines, sep="\n")
    if problems:
        print(f"verdict      NOT OK: {'; '.join(problems)} (exit 1)", flush=True)
        return 1
    print("verdict      OK: every group places and every estimate fits (exit 0)", flush=True)
    return 0
