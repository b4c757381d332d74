"""Weight sync, trainer -> engines, two ways:

- object_store: trainer rank 0 packs the full state dict (safetensors bytes) into Ray's object
  store; every engine fetches it and reloads in place. Simple, works anywhere.
- broadcast: every trainer rank and every engine worker (each TP rank) share one torch.distributed
  group made only for this (gloo on CPU, NCCL on GPU; it never touches Ray Train's or vLLM's
  groups). Weights go in flat dtype-grouped buckets; each trainer rank broadcasts its own part of
  every bucket (under ZeRO-3 exactly the partition it holds, so nothing is gathered), and the
  engines put the parts together and stream each bucket straight into vLLM's in-place reload.
  Across nodes the bytes leave through every training node's NICs, not rank 0's alone.

`WeightReceiver` is the vLLM side, in the spirit of OpenRLHF's vllm_worker_wrap.py: vLLM mixes it
into every worker (`LLM(worker_extension_cls=...)`), so its methods run on each TP rank with
`self.model_runner` at hand; `collective_rpc(name)` calls them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

# (HF name, shape, dtype name) per tensor; a bucket is a list of them with one dtype.
Spec = tuple[str, tuple[int, ...], str]


def plan_buckets(specs: list[Spec], bucket_bytes: int) -> list[list[Spec]]:
    """Consecutive tensors of one dtype, up to bucket_bytes per bucket (a bigger tensor goes alone).
    Keeping the model's order keeps each layer's tensors together, which vLLM's layerwise reload
    wants: it processes a layer as soon as all of its weights have arrived."""
    buckets: list[list[Spec]] = []
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * torch.empty(0, dtype=getattr(torch, spec[2])).element_size()
        if not buckets or buckets[-1][0][2] != spec[2] or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(spec)
        size += nbytes
    return buckets


def weight_group(master: str, port: int, rank: int, world_size: int, timeout_s: float) -> dist.ProcessGroup:
    """A process group of its own (TCPStore rendezvous, no default group touched): ranks 0..n-1
    are the trainer ranks (rank 0 hosts the store), the engine workers follow."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(master, port, world_size, is_master=rank == 0, timeout=timeout)
    # Config makes both ends GPU or both CPU (sync.method=broadcast), so each side's own device
    # picks the same backend; Ray hides GPUs from CPU-only actors.
    if torch.cuda.is_available():
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout  # a stalled peer fails the sync instead of hanging it
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, root: int) -> dist.Work:
    """Starts a broadcast from `root` and returns at once; `.wait()` on the result finishes it."""
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    return group.broadcast([tensor], opts)


def part_numel(numel: int, senders: int) -> int:
    """Elements of one sender's part of a tensor: ZeRO-3's partition size (padded at the end)."""
    return -(-numel // senders)


def own_part(param: torch.Tensor, rank: int, senders: int) -> torch.Tensor:
    """This rank's part of a parameter, flat: under ZeRO-3 the partition it holds (`ds_tensor`,
    elements [rank*size, (rank+1)*size) of the flat tensor, zero-padded), else the same slice
    cut from the full tensor."""
    size = part_numel(math.prod(getattr(param, "ds_shape", param.shape)), senders)
    if hasattr(param, "ds_tensor"):
        assert param.ds_tensor.numel() == size, "ZeRO-3 partition layout changed"
        return param.ds_tensor.detach().reshape(-1)
    piece = param.detach().reshape(-1)[rank * size : (rank + 1) * size]
    return torch.nn.functional.pad(piece, (0, size - piece.numel()))


def bucket_parts(
    group: dist.ProcessGroup, bucket: list[Spec], senders: int, own: torch.Tensor | None, device: Any
) -> list[tuple[torch.Tensor, dist.Work]]:
    """Starts one broadcast per sender for `bucket` (every member, in the same order); `own` is
    this rank's part when it is a sender. Returns each sender's (flat part, pending work)."""
    numel = sum(part_numel(math.prod(shape), senders) for _, shape, _ in bucket)
    parts = []
    for root in range(senders):
        flat = own if own is not None and root == group.rank() else None
        if flat is None:
            flat = torch.empty(numel, dtype=getattr(torch, bucket[0][2]), device=device)
        parts.append((flat, broadcast(group, flat, root)))
    return parts


def send_buckets(
    group: dist.ProcessGroup, plan: list[list[Spec]], params: dict[str, torch.Tensor], senders: int
) -> None:
    """The sending side of `WeightReceiver.receive_weights`, run by each of the `senders` trainer
    ranks: its own part of each bucket; it also receives the other ranks' parts (a broadcast
    reaches the whole group) and drops them. Bucket i+1 is cut while bucket i is on the wire."""
    rank = group.rank()
    in_flight: list[tuple[torch.Tensor, dist.Work]] = []
    for bucket in plan:
        own = torch.cat([own_part(params[name], rank, senders) for name, _, _ in bucket])
        parts = bucket_parts(group, bucket, senders, own, own.device)
        for _, work in in_flight:
            work.wait()
        in_flight = parts
    for _, work in in_flight:
        work.wait()


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


class WeightSyncError(RuntimeError):
    """A sync failed midway; some engines may hold half-updated weights until they reload."""


def connect(trainer: Any, engines: list, tensor_parallel_size: int, timeout_s: float) -> None:
    """Every trainer rank and every engine worker join a new weight-sync group, on a fresh port
    (again whenever an engine or the trainer group was replaced)."""
    senders = trainer.world_size
    world_size = senders + len(engines) * tensor_parallel_size
    master, port = trainer.call("weight_address")[0]
    joined = [
        e.join_weight_group.remote(master, port, senders + i * tensor_parallel_size, world_size, timeout_s)
        for i, e in enumerate(engines)
    ]
    trainer.call("join_weight_group", master=master, port=port, world_size=world_size, timeout_s=timeout_s)
    ray.get(joined, timeout=timeout_s)


def sync_weights(
    method: str, engines: list, trainer: Any, weights: Any, plan: list[list[Spec]], serving: str | None = None
) -> dict[str, float]:
    """Pushes the trainer's weights (of checkpoint `serving`) into every engine; raises
    WeightSyncError if any part fails."""
    start = time.perf_counter()
    try:
        if method == "object_store":
            reports = ray.get([e.load_weights.remote(weights, serving) for e in engines])
        else:
            received = [e.receive_weights.remote(plan, trainer.world_size, serving) for e in engines]
            trainer.call("broadcast_weights", plan=plan)
            reports = ray.get(received)
    except Exception as e:  # noqa: BLE001 - whatever broke, the caller makes every engine reload
        raise WeightSyncError(f"weight sync ({method}) failed midway: {e!r}") from e
    return {"sync/seconds": time.perf_counter() - start, "sync/bytes": reports[0]["bytes"]}
