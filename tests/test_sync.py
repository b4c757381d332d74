"""Weight sync trainer -> engines: the broadcast and object-store paths under ZeRO-3, and failure."""

import pytest
import ray
import torch
from helpers import hf_greedy, make_trainer, prompt_ids
from transformers import AutoModelForCausalLM, AutoTokenizer

from spin_ray.config import GenerationConfig
from spin_ray.generation import start_engines
from spin_ray.sync import WeightSyncError, connect, plan_buckets, sync_weights


@pytest.fixture(scope="module")
def world(ray_session, toy, tmp_path_factory, pairs):
    """2 fp32 engines and a 2-worker ZeRO-3 trainer joined in one weight-sync group."""
    out = tmp_path_factory.mktemp("sync")
    cfg = GenerationConfig(num_engines=2, temperature=0.0, max_tokens=8, kv_cache_gib=0.25)
    engines = start_engines(str(toy.model_dir), "float32", cfg, 256, seed=0)
    trainer = make_trainer(toy, out, "train.zero_stage=3")
    connect(trainer, engines, tensor_parallel_size=1, timeout_s=30)
    plan = plan_buckets(trainer.weight_specs(), bucket_bytes=64 * 1024)
    yield engines, trainer, plan, out
    trainer.stop()
    for e in engines:
        ray.kill(e)


def engines_match_checkpoint(engines, model_dir, tok) -> None:
    prompts = [prompt_ids(tok, f"{a}+{b}=") for a, b in [(12, 34), (56, 78), (90, 11), (23, 45), (67, 89), (31, 62)]]
    prompts += [prompt_ids(tok, f"{a}+{b}=", system="Add the numbers. " * 8) for a, b in [(12, 34), (99, 98)]]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    want = hf_greedy(model, tok, prompts, 8)
    for engine in engines:
        got = ray.get(engine.generate.remote({"prompt_ids": prompts, "seed": [0] * len(prompts)}, greedy=True))
        assert got["generated_ids"] == want


@pytest.mark.parametrize("method", ["broadcast", "object_store"])
def test_sync_serves_new_weights(world, pairs, toy, method):
    engines, trainer, plan, out = world
    assert len(plan) > 1 and len({b[0][2] for b in plan}) == 1  # several fp32 buckets
    trainer.train(0, ray.data.from_arrow(pairs))
    model_dir = out / f"{method}_model"
    weights = trainer.export(0, model_dir, pack_weights=method == "object_store")
    report = sync_weights(method, engines, trainer, weights, plan)
    assert report["sync/bytes"] > 100_000
    engines_match_checkpoint(engines, model_dir, AutoTokenizer.from_pretrained(toy.model_dir))


def test_failed_sync_stops_every_engine(world):
    engines, trainer, plan, _ = world
    ray.kill(engines[1])  # an engine dies just before the sync
    with pytest.raises(WeightSyncError, match="All engines were stopped"):
        sync_weights("broadcast", engines, trainer, None, plan)
    with pytest.raises(ray.exceptions.RayActorError):  # the survivor is not left half-updated
        ray.get(engines[0].ready.remote(), timeout=60)


def test_plan_buckets_groups_by_dtype_in_order():
    specs = [("a", (4, 4), "float32"), ("b", (4,), "float32"), ("c", (8,), "bfloat16"), ("d", (100,), "bfloat16")]
    assert plan_buckets(specs, bucket_bytes=80) == [[specs[0], specs[1]], [specs[2]], [specs[3]]]
