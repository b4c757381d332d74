"""A train rank's LoRA: one adapter on frozen base weights, and its snapshot as the reference.

p_{t-1} and p_t differ only in their adapters, so the reference needs no second model: the
adapter as it was when the iteration began is kept aside (a few MB), and a reference forward
pass swaps it in for the duration. Under ZeRO-3 each rank swaps only its own partitions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from safetensors.torch import load_file

from spin_ray.config import Config
from spin_ray.lora import ADAPTER_FILES, peft_config, split


def load_policy(cfg: Config, model_path: str) -> Any:
    """The base model with the run's adapter: a fresh one (B = 0, so p_0 is the base model) or,
    when `model_path` is an exported iteration, that adapter's weights, ready to train on."""
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base, adapter = split(model_path)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # else no gradient reaches an adapter inside a checkpointed block
    model = get_peft_model(model, peft_config(cfg.train.lora))
    if adapter:
        # The adapter's tensors are plain ones here (made outside ZeRO-3's Init), so this is a copy.
        result = set_peft_model_state_dict(model, load_file(f"{adapter}/{ADAPTER_FILES[1]}"))
        if result.unexpected_keys:
            raise ValueError(f"{adapter}: the adapter does not fit train.lora: {result.unexpected_keys[:3]}")
    return model


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _local(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor.data if hasattr(p, "ds_tensor") else p.data


class AdapterSnapshot:
    """The adapter at the iteration's start: the reference p_{t-1} on the policy's base weights."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for _, p in trainable(model)]
        self.saved = [_local(p).clone() for p in self.params]

    def refresh(self) -> None:
        for saved, p in zip(self.saved, self.params, strict=True):
            saved.copy_(_local(p))

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        live = [_local(p).clone() for p in self.params]
        try:
            for saved, p in zip(self.saved, self.params, strict=True):
                _local(p).copy_(saved)
            yield
        finally:
            for now, p in zip(live, self.params, strict=True):
                _local(p).copy_(now)


def adapter_state(model: torch.nn.Module, zero3: bool) -> dict[str, torch.Tensor]:
    """The adapter's full tensors on every rank (every rank must call it under ZeRO-3, which
    gathers the adapter only, never the base weights)."""
    params = trainable(model)
    if not zero3:
        return {name: p.detach().cpu().clone() for name, p in params}
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {name: p.detach().cpu().clone() for name, p in params}
