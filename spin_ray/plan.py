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

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from spin_ray.config import Config
from spin_ray.coordinator import Prepared

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# fp32 states per parameter: torch's AdamW keeps exp_avg and exp_avg_sq; RMSprop as training.py
# makes it (torch's defaults: no momentum, not centered) keeps square_avg only.
OPTIMIZER_STATES = {"adamw": 2, "rmsprop": 1}
# Activation bytes per hidden unit, token and layer in 16-bit: Korthikanti et al. 2022 ("Reducing
# Activation Recomputation in Large Transformer Models", eq. 1) without the 5as/h attention-score
# term, which SDPA and flash attention never store. Derived for a GPT layer; a Llama layer keeps
# somewhat more in its SwiGLU MLP (~38), so read it as an estimate.
ACTIVATION_BYTES = 34
# GiB per device by Ray's `accelerator_type:<name>` node resource (nominal sizes). Ray calls both
# A100 sizes "A100", so that one counts as the smaller.
GPU_GIB = {"H100": 80, "H200": 141, "H20": 96, "B200": 180, "A100": 40, "A100-40G": 40, "A100-80G": 80}
GPU_GIB |= {"L40S": 48, "L4": 24, "A10G": 24, "V100": 16, "T4": 16}
ASSUMED_GPU_GIB = 80.0
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster config, on the head
UNLIMITED = 1_000_000  # an autoscaler node type without a maximum


@dataclass(frozen=True)
class Shape:
    """What the estimates need from a model, read from config.json alone."""

    architecture: str
    params: int
    largest_layer: int  # parameters of the biggest single module: ZeRO-3 gathers it whole
    hidden: int
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int


def model_shape(model_path: str) -> Shape:
    """Builds the model on the meta device: shapes without memory, a 70B in well under a second."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    heads = text.num_attention_heads
    return Shape(
        architecture=type(model).__name__,
        params=sum(p.numel() for p in model.parameters()),  # tied weights are yielded once
        largest_layer=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
    )


@dataclass(frozen=True)
class Iteration:
    pairs: int
    per_rank: int
    micro_steps: int  # per rank
    optimizer_steps: int


def schedule(cfg: Config, prompts: int) -> list[Iteration]:
    """Steps per iteration as training.py takes them. Iteration t (0-based) trains on prompts x
    (1 + min(t, spin.mix_previous)) pairs; Trainer.train splits them equally over the ranks,
    dropping the remainder; each rank runs ceil(rows / batch_size) micro batches per epoch.
    DeepSpeed steps the optimizer whenever its job-wide micro-step count reaches a multiple of
    grad_accum, so micro batches left over at an iteration's end count toward the next one."""
    t = cfg.train
    iterations, done = [], 0
    for i in range(cfg.spin.iterations):
        pairs = prompts * (1 + min(i, cfg.spin.mix_previous))
        per_rank = pairs // t.num_workers
        micro = math.ceil(per_rank / t.batch_size) * t.epochs
        steps = (done + micro) // t.grad_accum - done // t.grad_accum
        iterations.append(Iteration(pairs, per_rank, micro, steps))
        done += micro
    return iterations


def model_states_bytes(stage: int, params: int, largest_layer: int, ranks: int, dtype_bytes: int, states: int) -> float:
    """One rank's parameters, gradients and optimizer states, from DeepSpeed's own ZeRO estimators
    (no offload). They assume mixed precision with Adam: 16-bit params and grads plus fp32 master
    weights, fp32 grads and two fp32 Adam states, 2 + 18/N bytes per parameter under ZeRO-2 and
    4 x largest layer + 18/N under ZeRO-3. Adjusted here for what they leave out:
    - ZeRO-0 is ZeRO-2 on one rank (nothing partitioned); ZeRO-1 also keeps whole 16-bit grads;
    - RMSprop keeps one fp32 state, not two: 4 bytes less per partitioned parameter;
    - float32 training has no 16-bit copies, so its params and grads take 4 bytes, not 2 (ZeRO-0
      in float32 has no master copy either; still counted, so an upper bound there).
    Like DeepSpeed's, the estimate leaves out communication buckets (reduce_bucket_size and
    stage3_max_live_parameters at their defaults: up to ~1-2 GiB more).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shards = ranks if stage else 1
    if stage == 3:
        estimate = estimate_zero3_model_states_mem_needs(params, largest_layer, ranks, cpu_offload=False)[1]
    else:
        estimate = estimate_zero2_model_states_mem_needs(params, shards, cpu_offload=False)[1]
    if stage == 1:
        estimate += 2 * params * (1 - 1 / ranks)
    params_16 = params / ranks if stage == 3 else params
    grads_16 = params if stage <= 1 else params / ranks
    estimate += (dtype_bytes - 2) * (params_16 + grads_16)
    return estimate - 4 * (2 - states) * params / shards


def training_memory(cfg: Config, shape: Shape) -> dict[str, float]:
    """Bytes one training rank holds at its peak (the end of the policy's forward pass), by part."""
    t, d = cfg.train, cfg.data
    b = DTYPE_BYTES[cfg.model.dtype]
    states = OPTIMIZER_STATES[t.optimizer]
    memory = {
        "model states": model_states_bytes(t.zero_stage, shape.params, shape.largest_layer, t.num_workers, b, states)
    }
    if cfg.spin.objective == "spin" and cfg.spin.reference == "model":
        # training.py partitions the frozen copy like the policy under ZeRO-3 and keeps it whole
        # in model.dtype otherwise (the SFT baseline has none). Its forward keeps no activations.
        memory["reference"] = shape.params * b / (t.num_workers if t.zero_stage == 3 else 1)
    # A micro batch's sequences (real and generated sides under SPIN) are padded to the longest.
    tokens = t.batch_size * _sides(cfg) * (d.max_prompt_tokens + _longest_response(cfg))
    layer = ACTIVATION_BYTES * b / 2 * shape.hidden * tokens
    if t.gradient_checkpointing:  # each layer's input is kept; one layer is recomputed at a time
        memory["activations"] = shape.layers * b * shape.hidden * tokens + layer
    else:
        memory["activations"] = shape.layers * layer
    # In sequence_logps the logits, their float32 copy (none when they are float32 already) and
    # the float32 log_softmax (kept for backward) are alive at once.
    memory["logits"] = tokens * shape.vocab * (8 + (b if b < 4 else 0))
    return memory


@dataclass(frozen=True)
class EngineMemory:
    weights: float  # per GPU (on CPU: the whole engine)
    kv_cache: float  # per GPU (on CPU: the whole engine)
    kv_token: float  # bytes one token takes in the whole engine's KV cache
    kv_tokens: int  # tokens the whole engine's KV cache holds


def engine_memory(cfg: Config, shape: Shape, gpu_gib: float) -> EngineMemory:
    g = cfg.generation
    b = DTYPE_BYTES[cfg.model.dtype]
    kv_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * b  # K and V of every layer
    if g.num_gpus == 0:
        kv = g.kv_cache_gib * 2**30
        return EngineMemory(shape.params * b, kv, kv_token, int(kv / kv_token))
    tp = g.tensor_parallel_size
    weights = shape.params * b / tp
    # An upper bound: vLLM also sets aside its profiled activation peak (and CUDA graphs).
    kv = max(0.0, g.gpu_memory_utilization * gpu_gib * 2**30 - weights)
    return EngineMemory(weights, kv, kv_token, int(kv * tp / kv_token))


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    more: int  # nodes of this type the autoscaler may still add


@dataclass
class Cluster:
    """Where the job could run: live nodes' total resources and what an autoscaler can add."""

    where: str
    nodes: list[dict[str, float]]
    node_types: list[NodeType] = field(default_factory=list)
    max_new_nodes: int = 0
    gpu_gib: float | None = None  # per device; None: not known, ASSUMED_GPU_GIB is used
    gpu_source: str = ""
    host_gib: float | None = None  # this machine's RAM, for a local run's parts on CPU


def ray_address(cfg: Config) -> str | None:
    """The cluster the job joins (run.ray_address, else RAY_ADDRESS); None: it starts a local Ray."""
    return cfg.run.ray_address or os.environ.get("RAY_ADDRESS")


def local_cpus(cfg: Config) -> int:
    """Logical CPUs of the local Ray jobs/spin.py starts: at least what the job asks for, plus 2
    (engines and train workers mostly wait on each other, and too few slots leave an actor
    pending forever without a word)."""
    g, t = cfg.generation, cfg.train
    return max(os.cpu_count() or 1, math.ceil(g.num_engines * g.num_cpus + t.num_workers * t.num_cpus + 2))


def local_cluster(cfg: Config) -> Cluster:
    """This machine as jobs/spin.py's local Ray would see it, without starting one."""
    import psutil
    import torch

    cores, cpus = os.cpu_count() or 1, local_cpus(cfg)
    gpus = torch.cuda.device_count()
    ram = psutil.virtual_memory().total / 2**30
    node = {"CPU": float(cpus)} | ({"GPU": float(gpus)} if gpus else {})
    where = f"this machine: {cores} cores ({cpus} logical CPUs for Ray, as jobs/spin.py gives), {gpus} GPUs, "
    where += f"{ram:.1f} GiB RAM"
    if not gpus:
        return Cluster(where, [node], host_gib=ram)
    gib = min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus)) / 2**30
    return Cluster(where, [node], gpu_gib=gib, gpu_source="torch.cuda", host_gib=ram)


def connected_cluster(address: str) -> Cluster:
    """A running cluster's live nodes and its autoscaler's node types, read as a driver."""
    import ray

    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        return Cluster(f"cannot connect to the Ray cluster at {address}: {e}", [])
    try:
        gcs = ray.get_runtime_context().gcs_address
        nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n["Alive"]]
        node_types, max_new, source = autoscaler_node_types(nodes)
    finally:
        ray.shutdown()
    where = f"Ray cluster at {gcs}: {len(nodes)} live node(s) with {_res(_sum(nodes, ('CPU', 'GPU')))}"
    if node_types:
        kinds = ", ".join(
            f"{t.name} x{t.more if t.more < UNLIMITED else 'any'} {_res(t.resources)}" for t in node_types
        )
        where += f"\n{'':13}the autoscaler ({source}) may add {max_new} nodes: {kinds}"
    else:
        where += f"\n{'':13}no autoscaler node types ({source}): only the live nodes count"
    prefix = "accelerator_type:"  # Ray's node resource naming the GPU model
    names = {
        k.removeprefix(prefix) for r in nodes + [t.resources for t in node_types] for k in r if k.startswith(prefix)
    }
    sizes = {name: GPU_GIB[name] for name in names if name in GPU_GIB}
    if not sizes:
        return Cluster(where, nodes, node_types, max_new)
    smallest = min(sizes, key=sizes.__getitem__)
    return Cluster(where, nodes, node_types, max_new, float(sizes[smallest]), f"{prefix}{smallest}")


def autoscaler_node_types(nodes: list[dict[str, float]]) -> tuple[list[NodeType], int, str]:
    """(node types and how many more of each, most new nodes in all, where they were read).

    Ray 2.60 has no public API for this. The GCS holds a ClusterConfig when an autoscaler reports
    one (KubeRay's; Ray Data reads it the same way); a `ray up` cluster keeps its config in
    ~/ray_bootstrap_config.yaml on the head, where `ray job submit` runs the driver."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        groups = [(c.name, dict(c.resources), c.max_count) for c in config.node_group_configs]
        return *node_types(groups, nodes, None), "GCS cluster config"
    path = Path(BOOTSTRAP_CONFIG).expanduser()
    if path.exists():
        return *launcher_node_types(yaml.safe_load(path.read_text()), nodes), BOOTSTRAP_CONFIG
    return [], 0, f"no GCS cluster config, no {BOOTSTRAP_CONFIG}"


def launcher_node_types(config: dict, nodes: list[dict[str, float]]) -> tuple[list[NodeType], int]:
    """The worker node types of a cluster-launcher config such as cluster.yaml."""
    head = config.get("head_node_type")
    types = config.get("available_node_types", {})
    groups = [(n, s.get("resources", {}), s.get("max_workers", 0)) for n, s in types.items() if n != head]
    cap = config.get("max_workers")
    return node_types(groups, nodes, None if cap is None else max(0, cap - (len(nodes) - 1)))


def node_types(
    groups: list[tuple[str, dict, int]], nodes: list[dict[str, float]], max_new: int | None
) -> tuple[list[NodeType], int]:
    """(name, declared resources, max count or -1) -> node types less the nodes already up. A type
    that declares no resources is left out: they are detected only when such a node starts."""
    kinds = []
    for name, declared, max_count in groups:
        resources = {k: float(v) for k, v in declared.items()}
        if resources:
            running = sum(all(node.get(k) == v for k, v in resources.items()) for node in nodes)
            kinds.append(NodeType(name, resources, UNLIMITED if max_count == -1 else max(0, max_count - running)))
    return kinds, (min(UNLIMITED, sum(t.more for t in kinds)) if max_new is None else max_new)


@dataclass(frozen=True)
class Group:
    name: str
    count: int
    bundle: dict[str, float]


def groups(cfg: Config) -> list[Group]:
    """What the job asks Ray for, as generation.launch_engine and training.Trainer ask."""
    g, t = cfg.generation, cfg.train
    engine = {"CPU": g.num_cpus, "GPU": g.num_gpus * g.tensor_parallel_size, g.resource: 1}
    worker = {"CPU": t.num_cpus, "GPU": 1 if t.use_gpu else 0, t.resource: 1}
    return [Group("engines", g.num_engines, _asked(engine)), Group("workers", t.num_workers, _asked(worker))]


def _asked(resources: dict[str | None, float]) -> dict[str, float]:
    """Without zero amounts and an unset custom resource: Ray is not asked for those."""
    return {k: float(v) for k, v in resources.items() if k and v}


def place(cluster: Cluster, wanted: list[Group]) -> dict[str, tuple[bool, str]]:
    """Per group: (placed, how or why not). First fit, group by group, onto the live nodes, then
    onto nodes the autoscaler may add; a group gets what the groups before it left."""
    free = [dict(n) for n in cluster.nodes]
    more = {t.name: t.more for t in cluster.node_types}
    budget = cluster.max_new_nodes
    outcome: dict[str, tuple[bool, str]] = {}
    for group in wanted:
        left = _sum(free, group.bundle)
        kinds = [t for t in cluster.node_types if _fits(group.bundle, t.resources)]
        addable = [_scale(t.resources, min(more[t.name], budget)) for t in kinds]
        could_add = {k: v for k, v in _sum(addable, group.bundle).items() if v}
        added: Counter[str] = Counter()
        for _ in range(group.count):
            node = next((n for n in free if _fits(group.bundle, n)), None)
            if node is None:
                kind = next((t for t in kinds if more[t.name]), None)
                if kind is None or not budget:
                    break
                more[kind.name] -= 1
                budget -= 1
                added[kind.name] += 1
                node = dict(kind.resources)
                free.append(node)
            for k, v in group.bundle.items():
                node[k] -= v
        else:
            grown = ", ".join(f"{n} x{c}" for n, c in added.items())
            outcome[group.name] = (True, f"OK, the autoscaler adds {grown}" if added else "OK")
            continue
        why = f"needs {_res(_scale(group.bundle, group.count))}, cluster has {_res(left)}"
        why += f" + up to {_res(could_add)} from the autoscaler" if could_add else ""
        why += f" (left after the {', '.join(outcome)})" if outcome else ""
        every = cluster.nodes + [t.resources for t in cluster.node_types]
        # Nodes with every resource asked for, none with enough of it: the bundle is too big.
        if not any(_fits(group.bundle, n) for n in every) and any(group.bundle.keys() <= n.keys() for n in every):
            why += f"; no node holds one {_res(group.bundle)}"
        outcome[group.name] = (False, "WARN: cannot be placed: " + why)
    return outcome


def _sides(cfg: Config) -> int:
    """Sequences per training row: real and generated (SPIN), or the real one (the SFT baseline)."""
    return 2 if cfg.spin.objective == "spin" else 1


def _longest_response(cfg: Config) -> int:
    longest = cfg.data.max_response_tokens
    return max(longest, cfg.generation.max_tokens) if cfg.spin.objective == "spin" else longest


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items())


def _scale(resources: dict[str, float], n: float) -> dict[str, float]:
    return {k: v * n for k, v in resources.items()}


def _sum(nodes: list[dict[str, float]], keys) -> dict[str, float]:
    return {k: sum(n.get(k, 0.0) for n in nodes) for k in keys}


def _res(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k} {v:g}" for k, v in resources.items()) + "}"


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale / 10:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def plan(cfg: Config, prepared: Prepared, cluster: Cluster) -> tuple[list[str], list[str]]:
    """(the plan's lines, the problems that make the dry run fail)."""
    shape = model_shape(prepared.model_path)
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
    row_len = prompt_len + real_len + (prompt_len + generated_len if _sides(cfg) == 2 else 0)
    lines = [
        f"model        {shape.architecture}, {shape.params:,} parameters ({_count(shape.params)}), largest layer "
        f"{shape.largest_layer:,}, {cfg.model.dtype}",
        f"{'':13}hidden {shape.hidden}, {shape.layers} layers, {shape.kv_heads} KV heads x {shape.head_dim}, "
        f"vocab {shape.vocab}",
        f"data         {prompts:,} training prompts, {len(prepared.eval):,} held-out; mean prompt {prompt_len:.1f}, "
        f"real response {real_len:.1f} tokens",
        f"iterations   {cfg.spin.iterations}; pairs of iteration t: prompts x (1 + min(t-1, {cfg.spin.mix_previous})), "
        f"{t.epochs} epoch(s)",
        f"batch        {t.batch_size * t.grad_accum * t.num_workers} pairs per optimizer step = {t.batch_size} "
        f"x {t.grad_accum} accum x {t.num_workers} workers",
    ]
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
    if any(it.micro_steps % t.grad_accum for it in steps):
        lines.append(
            f"{'':13}note: train.grad_accum={t.grad_accum} does not divide the micro steps: leftovers carry over"
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
        total = _res(_scale(group.bundle, group.count))
        lines.append(f"{group.name:<13}{group.count} x {_res(group.bundle)} = {total}: {how}")
        if not placed:
            problems.append(f"{group.name} cannot be placed")
    return lines


def _memory(cfg: Config, prepared: Prepared, shape: Shape, cluster: Cluster, problems: list[str]) -> list[str]:
    g, t, d = cfg.generation, cfg.train, cfg.data
    gpu_gib = cluster.gpu_gib or ASSUMED_GPU_GIB
    lines = []
    if t.use_gpu or g.num_gpus:
        known = f"from {cluster.gpu_source}" if cluster.gpu_gib else "assumed (an H100 80GB): not known here"
        lines.append(f"GPU          {gpu_gib:.0f} GiB per GPU, {known}")

    train = training_memory(cfg, shape)
    total = sum(train.values())
    seq = d.max_prompt_tokens + _longest_response(cfg)
    checkpointing = "gradient checkpointing" if t.gradient_checkpointing else "no gradient checkpointing"
    explain = {
        "model states": f"params, grads, {t.optimizer} states (DeepSpeed's ZeRO-{t.zero_stage} estimator)",
        "reference": "frozen copy of p_t" + (", partitioned" if t.zero_stage == 3 else ", whole"),
        "activations": f"{_sides(cfg)} x {t.batch_size} sequences x {seq} tokens, {checkpointing}",
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
        f"per GPU (TP {g.tensor_parallel_size}, {g.gpu_memory_utilization:g} of the GPU)" if g.num_gpus else "in RAM"
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
