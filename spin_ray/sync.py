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
    collective_rpc args into nested lists. Tied weights (lm_head = embed_tokens) go once, under
    their first name, which is the one vLLM loads for tied models."""
    seen: set[int] = set()
    unique = {}
    for name, tensor in state_dict.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            unique[name] = tensor.detach().contiguous().cpu()
    return save_safetensors(unique)


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
        self._repack_tied_lm_head()
        return len(weights)

    def _repack_tied_lm_head(self) -> None:
        """On CPU, vLLM pre-packs each linear weight for its GEMM kernel after loading, and the
        in-place reload re-packs only modules that received tensors. A tied lm_head receives none
        (it shares embed_tokens' weight), so it would keep multiplying by the old embeddings."""
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        weight = getattr(lm_head, "weight", None)
        tied = any(m is not lm_head and getattr(m, "weight", None) is weight for m in model.modules())
        if weight is not None and tied:
            lm_head.quant_method.process_weights_after_loading(lm_head)
