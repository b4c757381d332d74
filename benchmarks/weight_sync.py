"""Weight sync seconds and GB/s: object store vs broadcast vs a raw torch.distributed broadcast.

For ~10, ~100 and ~500 MB fp32 Llama models (random weights, made here), one run measures:
- object_store: pack to safetensors bytes, ray.put, engine.load_weights (vLLM in-place reload);
- broadcast: a sender holding the model streams dtype buckets to the engine over the weight-sync
  group, which feeds vLLM's in-place reload (the job's path, spin_ray.weights);
- raw: torch.distributed broadcast of the same bytes between two plain processes: the ceiling
  of this machine's link for the broadcast path.

    python benchmarks/weight_sync.py [--sizes 10,100,500] [--bucket-mb 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray
import torch
from models import make_llama, start_engines

from spin_ray.cluster import free_address
from spin_ray.config import GenerationConfig, SyncConfig
from spin_ray.weights import broadcast, pack, plan_buckets, send_buckets, weight_group

# MB: (hidden size, layers); 16 * hidden^2 parameters per layer, 4 bytes each in fp32
SHAPES = {size: (hidden, layers) for size, hidden, layers in [(10, 256, 3), (100, 512, 6), (500, 1024, 8)]}
REPEATS = 3  # best of: first touches of fresh buffers make single runs noisy here


@ray.remote(num_cpus=0)
class Sender:
    """Stands in for trainer rank 0: the same bucket sender, without DeepSpeed around it."""

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        self.params = dict(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).named_parameters())
        self.address = free_address()

    def specs(self) -> list:
        return [(n, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in self.params.items()]

    def where(self) -> tuple[str, int]:
        return self.address

    def join(self, world_size: int) -> None:
        self.group = weight_group(*self.address, 0, world_size, 300)

    def send(self, plan: list) -> float:
        start = time.perf_counter()
        send_buckets(self.group, plan, self.params, senders=1)
        return time.perf_counter() - start


@ray.remote(num_cpus=0)
class RawPeer:
    def __init__(self, address: tuple[str, int], rank: int):
        self.address, self.rank = address, rank

    def join(self) -> None:
        self.group = weight_group(*self.address, self.rank, 2, 300)

    def broadcast(self, nbytes: int) -> float:
        flat = torch.ones(nbytes // 4) if self.rank == 0 else torch.empty(nbytes // 4)
        start = time.perf_counter()
        broadcast(self.group, flat, root=0).wait()
        return time.perf_counter() - start


def measure(model_dir: Path, bucket_mb: float) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    cfg = GenerationConfig(kv_cache_gib=0.25)
    engines = start_engines(model_dir, cfg, 64)
    (engine,) = engines.all()
    state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values())

    def object_store_once() -> float:
        start = time.perf_counter()
        ray.get(engine.load_weights.remote(ray.put(pack(state))))
        return time.perf_counter() - start

    object_store = min(object_store_once() for _ in range(REPEATS))

    sender = Sender.remote(str(model_dir))
    plan = plan_buckets(ray.get(sender.specs.remote()), int(bucket_mb * 2**20))
    master, port = ray.get(sender.where.remote())
    ray.get([sender.join.remote(2), engine.join_weight_group.remote(master, port, 1, 2, 300)])

    def broadcast_once() -> float:
        start = time.perf_counter()
        received = engine.receive_weights.remote(plan, 1)
        ray.get([sender.send.remote(plan), received])
        return time.perf_counter() - start

    broadcast_s = min(broadcast_once() for _ in range(REPEATS))

    address = free_address()  # one node: the driver's address is the peers' too
    peers = [RawPeer.remote(address, 0), RawPeer.remote(address, 1)]
    ray.get([p.join.remote() for p in peers])
    raw = min(max(ray.get([p.broadcast.remote(nbytes) for p in peers])) for _ in range(REPEATS))

    engines.shutdown()
    for actor in (sender, *peers):
        ray.kill(actor)
    return {"mb": nbytes / 2**20, "object_store": object_store, "broadcast": broadcast_s, "raw": raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,500", help="model sizes in MB, from " + str(list(SHAPES)))
    parser.add_argument("--bucket-mb", type=float, default=SyncConfig().bucket_mb)
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            hidden, layers = SHAPES[size]
            model_dir = Path(tmp) / f"llama-{size}mb"
            make_llama(
                model_dir,
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=hidden // 64,
                intermediate_size=4 * hidden,
                tie_word_embeddings=True,
            )
            rows.append(measure(model_dir, args.bucket_mb))
    print(f"\nweight sync, 1 engine, fp32, bucket {args.bucket_mb} MiB ({os.cpu_count()} cores, loopback)")
    print(
        f"{'MB':>7} {'object_store s':>15} {'GB/s':>6} {'broadcast s':>12} {'GB/s':>6} {'raw s':>7} {'GB/s':>6}"
        f" {'broadcast/raw':>14}"
    )
    for r in rows:
        gb = r["mb"] / 1024
        print(
            f"{r['mb']:>7.1f} {r['object_store']:>15.3f} {gb / r['object_store']:>6.2f} {r['broadcast']:>12.3f} "
            f"{gb / r['broadcast']:>6.2f} {r['raw']:>7.3f} {gb / r['raw']:>6.2f} {r['raw'] / r['broadcast']:>14.2f}"
        )


if __name__ == "__main__":
    main()
