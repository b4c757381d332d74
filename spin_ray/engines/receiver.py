"""The vLLM side of weight sync, in the spirit of OpenRLHF's vllm_worker_wrap.py.

vLLM mixes `WeightReceiver` into every worker (`LLM(worker_extension_cls=...)`), so its methods
run on each TP rank with `self.model_runner` at hand; the engine actor calls them through
`collective_rpc(name)`. See spin_ray.weights for the two transfer paths.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from spin_ray.weights import Spec, bucket_parts, part_numel, weight_group


class WeightReceiver:
    model_runner: object  # provided by the vLLM worker this class is mixed into

    def load_weights_bytes(self, payload: bytes) -> int:
        """Reload every tensor of `payload` in place; returns the bytes received.

        `model.load_weights` silently keeps the old weights on CPU after start-up (linear weights
        are repacked); `reload_weights` re-runs the loader's post-processing, so it works on both
        CPU and GPU. Each TP rank gets full tensors and the loader shards them.
        """
        weights = load_safetensors(payload)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        self._repack_tied_lm_head()
        return len(payload)

    def load_weights_dir(self, model_dir: str) -> int:
        """Reload from the safetensors files of an HF checkpoint; returns the bytes read."""
        from safetensors import safe_open

        files = sorted(Path(model_dir).glob("*.safetensors"))

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for f in files:
                with safe_open(str(f), "pt") as st:
                    for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                        yield name, st.get_tensor(name)

        self.model_runner.reload_weights(weights_iterator=tensors())
        self._repack_tied_lm_head()
        return sum(f.stat().st_size for f in files)

    def join_weight_group(self, master: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> int:
        rank = rank_offset + self.rank  # self.rank: this worker's rank inside its engine (TP)
        self._weight_group = weight_group(master, port, rank, world_size, timeout_s)
        return rank

    def receive_weights(self, plan: list[list[Spec]], senders: int) -> int:
        """Receives every bucket of `plan`, a part from each of the `senders` trainer ranks, puts
        each tensor together and reloads in place; returns bytes received."""
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        received = 0

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            # Bucket i+1 arrives while vLLM processes bucket i.
            nonlocal received
            pending = bucket_parts(self._weight_group, plan[0], senders, None, device)
            for i, bucket in enumerate(plan):
                parts = pending
                for _, work in parts:
                    work.wait()
                if i + 1 < len(plan):
                    pending = bucket_parts(self._weight_group, plan[i + 1], senders, None, device)
                received += sum(flat.numel() * flat.element_size() for flat, _ in parts)
                offset = 0
                for name, shape, _ in bucket:
                    numel = math.prod(shape)
                    size = part_numel(numel, senders)
                    pieces = [flat[offset : offset + size] for flat, _ in parts]
                    yield name, torch.cat(pieces)[:numel].view(shape)
                    offset += size

        self.model_runner.reload_weights(weights_iterator=stream())
        self._repack_tied_lm_head()
        return received

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
