"""Weight sync, trainer -> engines. This file is the vLLM side: a worker extension, in the
spirit of OpenRLHF's vllm_worker_wrap.py, that loads full HF-named weights in place.

vLLM mixes this class into every worker (`LLM(worker_extension_cls=...)`), so its methods run on
each tensor-parallel rank with `self.model_runner` at hand; `collective_rpc(name)` calls them.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


def pack(state_dict: dict[str, torch.Tensor]) -> bytes:
    """Serialise for the object-store path. Bytes, not tensors: multiprocess vLLM turns tensors in
    collective_rpc args into nested lists."""
    return save_safetensors({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})


class WeightReceiver:
    model_runner: object  # provided by the vLLM worker this class is mixed into

    def load_weights_bytes(self, payload: bytes) -> int:
        """Reload every tensor of `payload` in place; returns how many were loaded.

        `model.load_weights` silently keeps the old weights on CPU after start-up (linear weights
        are repacked); `reload_weights` re-runs the loader's post-processing, so it works on both
        CPU and GPU. Each TP rank gets full tensors and the loader shards them.
        """
        weights = load_safetensors(payload)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)
