"""The weight-sync wire format, shared by both ends: trainer ranks send, engine workers receive.

- object_store: trainer rank 0 packs the full state dict (safetensors bytes) into Ray's object
  store; every engine fetches it and reloads in place. Simple, works anywhere.
- broadcast: every trainer rank and every engine worker (each TP rank) share one torch.distributed
  group made only for this (gloo on CPU, NCCL on GPU; it never touches Ray Train's or vLLM's
  groups). Weights go in flat dtype-grouped buckets; each trainer rank broadcasts its own part of
  every bucket (under ZeRO-3 exactly the partition it holds, so nothing is gathered), and the
  engines put the parts together and stream each bucket straight into vLLM's in-place reload.
  Across nodes the bytes leave through every training node's NICs, not rank 0's alone.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save as save_safetensors

from spin_ray.private import nccl_options

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
    if torch.cuda.is_available():  # the timeout fails a stalled peer's sync instead of hanging it
        return dist.ProcessGroupNCCL(store, rank, world_size, nccl_options(timeout))
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
