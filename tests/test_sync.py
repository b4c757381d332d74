"""Weight sync trainer -> engines: the broadcast and object-store paths under ZeRO-3, and an engine
lost just before a sync (replaced, re-joined, serving the new weights)."""

import os
import signal
import time

import psutil
import pytest
import ray
import torch
from helpers import hf_greedy, make_engines, make_trainer, prompt_ids, stream_of
from transformers import AutoModelForCausalLM, AutoTokenizer

from spin_ray.config import load_config
from spin_ray.loop.sync import WeightSync
from spin_ray.weights import own_part, part_numel, plan_buckets

SYNCS = ("broadcast", "object_store")


@pytest.fixture(scope="module")
def world(ray_session, toy, tmp_path_factory, pairs):
    """2 fp32 engines and a 2-worker ZeRO-3 trainer joined in one weight-sync group."""
    out = tmp_path_factory.mktemp("sync")
    settings = ("generation.num_engines=2", "generation.temperature=0", "sync.bucket_mb=0.0625", "sync.timeout_s=10")
    engines, _ = make_engines(toy, *settings, "generation.health_timeout_s=15")
    trainer = make_trainer(toy, out, "train.zero_stage=3")
    syncs = {m: WeightSync(load_config(None, [*settings, f"sync.method={m}"]), engines, trainer) for m in SYNCS}
    yield engines, trainer, out, syncs
    trainer.stop()
    engines.shutdown()


def engines_match_checkpoint(engines, model_dir, tok) -> None:
    prompts = [prompt_ids(tok, f"{a}+{b}=") for a, b in [(12, 34), (56, 78), (90, 11), (23, 45), (67, 89), (31, 62)]]
    prompts += [prompt_ids(tok, f"{a}+{b}=", system="Add the numbers. " * 8) for a, b in [(12, 34), (99, 98)]]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    want = hf_greedy(model, tok, prompts, 8)
    for engine in engines:
        got = ray.get(engine.generate.remote({"prompt_ids": prompts, "seed": [0] * len(prompts)}, greedy=True))
        assert got["generated_ids"] == want


def train_and_export(trainer, pairs, model_dir, pack: bool):
    """The next iteration t; returns (t, the packed weights)."""
    t = ray.get(trainer.channel.holds.remote()) + 1
    again = lambda: stream_of(pairs, model_dir.with_name(model_dir.name + "-pairs"))  # noqa: E731
    trainer.train(t, again())
    return t, trainer.export(t, model_dir, again, pack_weights=pack)


def test_broadcast_then_object_store_serve_new_weights(world, pairs, toy):
    engines, trainer, out, syncs = world
    tok = AutoTokenizer.from_pretrained(toy.model_dir)
    t, _ = train_and_export(trainer, pairs, out / "broadcast", pack=False)
    report = syncs["broadcast"](t, out / "broadcast", None)  # joins the group, then broadcasts
    plan = syncs["broadcast"].plan
    assert len(plan) > 1 and len({b[0][2] for b in plan}) == 1  # several fp32 buckets
    assert report.bytes > 100_000
    engines_match_checkpoint(engines.all(), out / "broadcast", tok)

    t, weights = train_and_export(trainer, pairs, out / "object_store", pack=True)
    report = syncs["object_store"](t, out / "object_store", weights)
    assert report.bytes > 100_000
    engines_match_checkpoint(engines.all(), out / "object_store", tok)


def test_engine_frozen_during_broadcast_is_replaced_and_all_serve_new_weights(world, pairs, toy):
    """SIGSTOP one engine just before a broadcast: the broadcast times out (sync.timeout_s=10), the
    frozen engine misses its health deadline (15 s) and is replaced, and every engine ends up
    serving the new checkpoint; the next sync re-forms the group with the replacement in it."""
    engines, trainer, out, syncs = world
    tok = AutoTokenizer.from_pretrained(toy.model_dir)
    t, _ = train_and_export(trainer, pairs, out / "after_loss", pack=False)
    victim = ray.get(engines.all()[1].ready.remote())["pid"]
    os.kill(victim, signal.SIGSTOP)
    frozen_at = time.time()
    report = syncs["broadcast"](t, out / "after_loss", None)
    assert report.bytes is None  # the broadcast broke; every engine reloaded from disk
    events = engines.stats()["engine_replacements"]
    (frozen,) = [e for e in events if e["old_pid"] == victim]
    assert "no answer to a health ping within 15" in frozen["cause"]
    assert frozen["lost_at"] - frozen_at < 15 + 5 + 3  # deadline + ping interval + slack
    # The survivor may have taken half the buckets into vLLM's layerwise reload, which then cannot
    # reload again: it is replaced too, never left serving half-updated weights.
    assert len(events) <= 2 and engines.stats()["engine_starts"] == 2 + len(events)
    engines_match_checkpoint(engines.all(), out / "after_loss", tok)
    t, _ = train_and_export(trainer, pairs, out / "next", pack=False)
    assert syncs["broadcast"](t, out / "next", None).bytes is not None
    engines_match_checkpoint(engines.all(), out / "next", tok)
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE


def test_the_senders_parts_put_together_are_the_tensor():
    """Every trainer rank sends elements [rank*size, (rank+1)*size) of each flat tensor, the last
    part zero-padded (ZeRO-3's partition layout); the engines join the parts and drop the padding."""
    tensor = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    for senders in (1, 2, 3, 4, 7):
        parts = [own_part(tensor, rank, senders) for rank in range(senders)]
        assert {p.numel() for p in parts} == {part_numel(30, senders)}
        assert torch.equal(torch.cat(parts)[:30].view(10, 3), tensor)


def test_plan_buckets_groups_by_dtype_in_order():
    specs = [("a", (4, 4), "float32"), ("b", (4,), "float32"), ("c", (8,), "bfloat16"), ("d", (100,), "bfloat16")]
    assert plan_buckets(specs, bucket_bytes=80) == [[specs[0], specs[1]], [specs[2]], [specs[3]]]
