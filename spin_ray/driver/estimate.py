"""What a job would need, estimated from config.json alone: model shape, steps, memory.

The model is counted on the meta device (no weights are read); memory per training rank follows
DeepSpeed's own ZeRO estimators, and per engine what vLLM will reserve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spin_ray.config import Config, LoraConfig
from spin_ray.lora import peft_config

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
    trainable: int  # parameters that train: all, or the LoRA adapter's


def model_shape(model_path: str, lora: LoraConfig | None = None) -> Shape:
    """Builds the model on the meta device: shapes without memory, a 70B in well under a second.
    With `lora`, PEFT adds the adapter there too, so its size is PEFT's own count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())  # tied weights are yielded once
        largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        trainable = params
        if lora:
            from peft import get_peft_model

            adapted = get_peft_model(model, peft_config(lora))
            trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    text = config.get_text_config()
    heads = text.num_attention_heads
    return Shape(
        architecture=type(model).__name__,
        params=params,
        largest_layer=largest_layer,
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        trainable=trainable,
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
    dropping the remainder; each rank runs ceil(rows / batch_size) micro batches per epoch,
    grad_accum to an optimizer step and an epoch's leftover as one smaller step at its end
    (spin_ray.trainer.ds.accumulation), so every iteration ends on an optimizer step."""
    t = cfg.train
    iterations = []
    for i in range(cfg.spin.iterations):
        pairs = prompts * (1 + min(i, cfg.spin.mix_previous))
        per_rank = pairs // t.num_workers
        per_epoch = math.ceil(per_rank / t.batch_size)
        iterations.append(
            Iteration(pairs, per_rank, per_epoch * t.epochs, math.ceil(per_epoch / t.grad_accum) * t.epochs)
        )
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
    shards = t.num_workers if t.zero_stage == 3 else 1
    reference = cfg.spin.objective == "spin" and cfg.spin.reference == "model"
    if t.lora:
        # Frozen base weights in model.dtype (partitioned under ZeRO-3, plus the layer gathered
        # whole); params, grads and optimizer states of the adapter alone; the reference is a
        # snapshot of the adapter.
        memory = {"base weights": shape.params * b / shards + (shape.largest_layer * b if shards > 1 else 0)}
        memory["adapter states"] = model_states_bytes(
            t.zero_stage, shape.trainable, shape.trainable, t.num_workers, b, states
        )
        if reference:
            memory["reference"] = shape.trainable * b / shards
    else:
        memory = {
            "model states": model_states_bytes(
                t.zero_stage, shape.params, shape.largest_layer, t.num_workers, b, states
            )
        }
        if reference:
            # training.py partitions the frozen copy like the policy under ZeRO-3 and keeps it
            # whole in model.dtype otherwise (the SFT baseline has none). No activations kept.
            memory["reference"] = shape.params * b / shards
    # A micro batch's sequences (real and generated sides under SPIN) are padded to the longest.
    tokens = t.batch_size * sides(cfg) * (d.max_prompt_tokens + longest_response(cfg))
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
    weights: float  # per tensor-parallel rank (a GPU, or on CPU a process)
    kv_cache: float  # per tensor-parallel rank
    kv_token: float  # bytes one token takes in the whole engine's KV cache
    kv_tokens: int  # tokens the whole engine's KV cache holds


def engine_memory(cfg: Config, shape: Shape, gpu_gib: float) -> EngineMemory:
    g = cfg.generation
    b = DTYPE_BYTES[cfg.model.dtype]
    kv_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * b  # K and V of every layer
    tp = g.tensor_parallel_size
    weights = shape.params * b / tp
    if g.num_gpus == 0:
        kv = g.kv_cache_gib * 2**30  # vLLM's kv_cache_memory_bytes is per rank
    else:  # an upper bound: vLLM also sets aside its profiled activation peak (and CUDA graphs)
        kv = max(0.0, g.gpu_memory_utilization * gpu_gib * 2**30 - weights)
    return EngineMemory(weights, kv, kv_token, int(kv * tp / kv_token))


def sides(cfg: Config) -> int:
    """Sequences per training row: real and generated (SPIN), or the real one (the SFT baseline)."""
    return 2 if cfg.spin.objective == "spin" else 1


def longest_response(cfg: Config) -> int:
    longest = cfg.data.max_response_tokens
    return max(longest, cfg.generation.max_tokens) if cfg.spin.objective == "spin" else longest
