"""The engine shape GPUs use, on CPU: generation.tensor_parallel_size=2 makes an engine three
processes (vLLM's engine core in a child process, one worker process per TP rank). It generates,
takes new weights into its TP shards by both sync paths, scores, and when its engine core or a TP
worker dies mid-generation it is replaced and no answer is lost or changed."""

import os
import re
import signal

import psutil
import pyarrow as pa
import pytest
import ray
from helpers import free_port, hf_greedy, hf_sums, make_engines, perturbed, prompt_ids

from spin_ray.engines.client import through_engines
from spin_ray.weights import pack, plan_buckets, send_buckets, weight_group

TP = 2


@pytest.fixture(scope="module")
def engines(ray_session, toy):
    engines, cfg = make_engines(
        toy, f"generation.tensor_parallel_size={TP}", "generation.temperature=1.0", "generation.batch_size=16"
    )
    yield cfg.generation, engines
    engines.shutdown()


def processes(engine) -> dict[str, int]:
    """vLLM's processes under an engine actor, by title: VLLM::EngineCore, VLLM::Worker_TP<r>."""
    pid = ray.get(engine.ready.remote())["pid"]
    return {p.name(): p.pid for p in psutil.Process(pid).children(recursive=True) if p.name().startswith("VLLM::")}


def test_tp2_engine_generates_takes_weights_into_its_shards_and_scores_like_hf(engines, tok, toy):
    _, pool = engines
    (engine,) = pool.all()
    assert processes(engine).keys() == {"VLLM::EngineCore", "VLLM::Worker_TP0", "VLLM::Worker_TP1"}
    prompts = [prompt_ids(tok, f"{a}+{b}=") for a, b in [(12, 34), (56, 78), (90, 11), (23, 45), (99, 98)]]
    prompts += [prompt_ids(tok, "31+62=", system="You are a careful calculator. " * 5)]  # a full KV block
    batch = {"prompt_ids": prompts, "seed": [0] * len(prompts)}

    def greedy() -> list[list[int]]:
        return ray.get(engine.generate.remote(batch, greedy=True))["generated_ids"]

    start = perturbed(toy.model_dir, seed=0, scale=0.0)
    assert greedy() == hf_greedy(start, tok, prompts, 8)

    # object store: full tensors to every rank, each loads its own shard
    new = perturbed(toy.model_dir, seed=1)
    report = ray.get(engine.load_weights.remote(pack(new.state_dict())))
    assert report["bytes"] > 100_000
    assert greedy() == hf_greedy(new, tok, prompts, 8)

    # broadcast: this process sends as the only trainer rank, both TP ranks receive every bucket
    newer = perturbed(toy.model_dir, seed=2)
    params = dict(newer.named_parameters())
    plan = plan_buckets([(n, tuple(p.shape), "float32") for n, p in params.items()], bucket_bytes=64 * 1024)
    assert len(plan) > 2
    port = free_port()
    joined = engine.join_weight_group.remote("127.0.0.1", port, 1, 1 + TP, 30)
    group = weight_group("127.0.0.1", port, 0, 1 + TP, 30)
    assert ray.get(joined) == [1, 2]  # the group ranks of TP ranks 0 and 1
    received = engine.receive_weights.remote(plan, 1)
    send_buckets(group, plan, params, 1)
    assert ray.get(received)["bytes"] == sum(p.numel() * 4 for p in params.values())
    assert greedy() == hf_greedy(newer, tok, prompts, 8)

    responses = [tok.encode("46<|end|>", add_special_tokens=False)] * len(prompts)
    got = [total for total, _ in ray.get(engine.score.remote(prompts, responses))]
    assert got == pytest.approx(hf_sums(newer, prompts, responses), abs=1e-4)


@pytest.mark.parametrize("victim", ["VLLM::EngineCore", "VLLM::Worker_TP1"])
def test_a_dead_engine_core_or_tp_worker_mid_generation_loses_no_answer(engines, tok, toy, victim):
    """SIGKILL one of vLLM's processes while the engine actor lives: the batch fails with vLLM's
    EngineDeadError (or the health ping sees its dead flag), the pool replaces the engine, and the
    lost batches run again: every answer equals the fault-free one."""
    cfg, pool = engines
    questions = [f"{10 + i % 90}+{i % 77 + 10}=" for i in range(400)]
    rows = pa.Table.from_pylist(
        [{"uid": q, "prompt_ids": prompt_ids(tok, q), "seed": i} for i, q in enumerate(questions)]
    )
    (engine,) = pool.all()
    ray.get(engine.load_checkpoint.remote(str(toy.model_dir)))  # the weights a replacement starts from
    before = pool.stats()["engine_replacements"]
    want = {r["uid"]: r["generated_ids"] for r in through_engines(rows, pool.generate, cfg).iter_rows()}
    got = {}
    for k, row in enumerate(through_engines(rows, pool.generate, cfg).iter_rows()):
        if k == cfg.batch_size:  # the first batch is back, the next ones are in flight
            os.kill(processes(engine)[victim], signal.SIGKILL)
        got[row["uid"]] = row["generated_ids"]
    assert got == want
    (lost,) = pool.stats()["engine_replacements"][len(before) :]
    assert re.search("vLLM is dead|engine core process died", lost["cause"]), lost
    assert processes(pool.all()[0]).keys() == {"VLLM::EngineCore", "VLLM::Worker_TP0", "VLLM::Worker_TP1"}
