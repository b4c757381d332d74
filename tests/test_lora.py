"""LoRA SPIN on the real DeepSpeed (ZeRO-3, 2 ranks) and vLLM (2 engines): the first steps equal
plain PEFT + spin_loss, the engines serve exactly the exported adapter after the swap (and a new
engine started from it does too), the merged export answers like base + adapter, and a trainer
resumed from an exported adapter ends where an uninterrupted one does; Ray Serve answers from the
adapter on its base model."""

import json
import math
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
from helpers import dealt, free_port, hf_greedy, make_engines, make_trainer, prompt_ids, stream_of
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from spin_ray.config import load_config
from spin_ray.engines.client import Engines
from spin_ray.loop.sync import WeightSync
from spin_ray.lora import merge, peft_config
from spin_ray.loss import spin_loss
from spin_ray.serve.app import serve_models

LORA = ("train.lora.r=8", "train.lora.alpha=16")
ROOT = Path(__file__).resolve().parent.parent


def seeded_adapter(base_dir, out, seed: int):
    """An adapter whose B is not 0, so p_0 is not the base model and every check sees the adapter."""
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        peft_config(load_config(None, list(LORA)).train.lora),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)  # as every exported iteration has
    return out


def summed_logps(model, prompts, responses):
    """log p(response | prompt) per pair, one sequence at a time, with gradients."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        logp = model(torch.tensor([p + r])).logits[0].log_softmax(-1)
        out.append(torch.stack([logp[len(p) - 1 + j, t] for j, t in enumerate(r)]).sum())
    return torch.stack(out)


def plain_peft_losses(base_dir, adapter, rows, steps, lr: float) -> list[tuple[float, float]]:
    """(loss, logps/real) of each step as plain PEFT + torch computes them: the reference is the
    starting adapter, each step's pairs are what both ranks saw (their gradients averaged)."""
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter, is_trainable=True)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    out = []
    for uids in steps:
        batch = [rows[u] for u in uids]
        args = ([r["prompt_ids"] for r in batch], [r["real_ids"] for r in batch], [r["generated_ids"] for r in batch])
        with torch.no_grad():
            ref_real, ref_gen = summed_logps(reference, args[0], args[1]), summed_logps(reference, args[0], args[2])
        real, gen = summed_logps(policy, args[0], args[1]), summed_logps(policy, args[0], args[2])
        losses, _, _ = spin_loss(real, gen, ref_real, ref_gen, 0.1, "sigmoid")
        out.append((losses.mean().item(), real.mean().item()))
        opt.zero_grad()
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return out


@pytest.fixture(scope="module")
def trained(ray_session, toy, pairs, tmp_path_factory):
    """A ZeRO-3 LoRA trainer (2 ranks) started from a seeded adapter, after iteration 1 and its export."""
    out = tmp_path_factory.mktemp("lora")
    start = seeded_adapter(toy.model_dir, out / "iter_0" / "model", seed=0)
    settings = (*LORA, "train.zero_stage=3", "train.batch_size=4", "spin.stream=false")
    trainer = make_trainer(toy, out, *settings, model_path=start)
    again = lambda: stream_of(pairs, out / "pairs", batch_size=4)  # noqa: E731
    result = trainer.train(1, again())
    weights = trainer.export(1, out / "iter_1" / "model", again, pack_weights=True)
    merge(out / "iter_1" / "model", out / "iter_1" / "merged", "float32")  # what the coordinator runs as a task
    yield out, trainer, result, weights, again
    trainer.stop()


def test_first_lora_steps_equal_plain_peft_and_spin_loss(trained, toy, pairs):
    out, _, result, _, again = trained
    steps = [[u for rank in step for u in rank] for step in dealt(again(), 2)]
    assert [len(s) for s in steps] == [8, 8]  # 16 pairs, 2 ranks, micro batches of 4
    want = plain_peft_losses(
        toy.model_dir, out / "iter_0" / "model", {r["uid"]: r for r in pairs.to_pylist()}, steps, 1e-3
    )
    got = [(line["loss"], line["logps/real"]) for line in result.logs]
    assert got[0][0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: the starting adapter
    assert got[0][1] == pytest.approx(want[0][1], abs=1e-4)  # the adapter's log-probs, not the base's
    assert got[1][0] == pytest.approx(want[1][0], abs=1e-5) and abs(got[1][0] - math.log(2)) > 1e-3  # moved
    assert got[1][1] == pytest.approx(want[1][1], abs=1e-4)
    files = sorted(p.name for p in (out / "iter_1" / "model").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files) and "model.safetensors" not in files


def test_engines_serve_the_exported_adapter_and_merged_equals_base_plus_adapter(trained, toy, tok):
    out, trainer, _, weights, _ = trained
    adapter = out / "iter_1" / "model"
    prompts = [prompt_ids(tok, f"{a}+{b}=") for a, b in [(12, 34), (56, 78), (90, 11), (23, 45), (67, 89)]]
    base = AutoModelForCausalLM.from_pretrained(toy.model_dir, dtype=torch.float32)
    want = hf_greedy(PeftModel.from_pretrained(base, adapter).eval(), tok, prompts, 8)
    before = hf_greedy(AutoModelForCausalLM.from_pretrained(toy.model_dir).eval(), tok, prompts, 8)
    assert want != before  # the adapter changes the answers
    merged = AutoModelForCausalLM.from_pretrained(out / "iter_1" / "merged", dtype=torch.float32).eval()
    assert hf_greedy(merged, tok, prompts, 8) == want
    assert AutoModelForCausalLM.from_pretrained(adapter).peft_config  # transformers loads the adapter dir too

    engines, cfg = make_engines(toy, *LORA, "generation.num_engines=2")
    try:
        synced = WeightSync(cfg, engines, trainer)(1, adapter, weights)
        assert synced.bytes == sum(f.stat().st_size for f in adapter.glob("adapter_*"))
        assert synced.bytes < 100_000  # the adapter: tens of KB for this model, not the whole of it
        for engine in engines.all():
            got = ray.get(engine.generate.remote({"prompt_ids": prompts, "seed": [0] * len(prompts)}, greedy=True))
            assert got["generated_ids"] == want
    finally:
        engines.shutdown()
    # A replacement (or a resumed job's engine) starts from the exported adapter.
    fresh = Engines(cfg, str(adapter), 256)
    try:
        fresh.wait_ready()
        got = fresh.generate({"prompt_ids": prompts, "seed": [0] * len(prompts)}, greedy=True)
        assert got["generated_ids"] == want
    finally:
        fresh.shutdown()


def test_resumed_lora_trainer_ends_with_the_same_adapter(trained, toy, pairs):
    """Iteration 2 by the trainer that made p_1 in memory, and by a fresh one started from the
    exported p_1 (what a resumed job does): bit-equal adapters (fp32, seeded)."""
    out, trainer, _, _, again = trained
    trainer.train(2, again())
    trainer.export(2, out / "iter_2" / "model", again, pack_weights=False)
    settings = (*LORA, "train.zero_stage=3", "train.batch_size=4", "spin.stream=false")
    resumed = make_trainer(toy, out / "resumed", *settings, model_path=out / "iter_1" / "model", holds=1)
    try:
        resumed.train(2, again())
        resumed.export(2, out / "resumed" / "iter_2" / "model", again, pack_weights=False)
    finally:
        resumed.stop()
    a, b = (load_file(d / "iter_2" / "model" / "adapter_model.safetensors") for d in (out, out / "resumed"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # lora_A and lora_B of 7 linear layers in 2 blocks
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_serve_answers_from_the_adapter_on_its_base_model(trained, toy, tok):
    """jobs/serve.py on a LoRA iteration: Serve LLM runs the base model and the adapter answers."""
    import openai
    from ray import serve

    adapter = trained[0] / "iter_1" / "model"
    overrides = [*LORA, f"serve.port={free_port()}", "serve.max_tokens=8", "generation.kv_cache_gib=0.25"]
    url = serve_models({"spin-iter-1": adapter}, load_config(None, overrides), max_model_len=48, api_key=None)
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    questions = [f"{a}+{b}=" for a, b in [(12, 34), (56, 78), (90, 11), (23, 45), (67, 89)]]
    base = AutoModelForCausalLM.from_pretrained(toy.model_dir).eval()
    tuned = AutoModelForCausalLM.from_pretrained(adapter).eval()  # transformers + peft load the adapter dir
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                assert [m.id for m in client.models.list()] == ["spin-iter-1"]
                break
            except (openai.APIError, AssertionError):
                assert time.monotonic() < deadline, "the endpoint did not come up in 10 minutes"
                time.sleep(2)
        differ = 0
        for q in questions:
            ids = [prompt_ids(tok, q)]
            want = tok.decode(hf_greedy(tuned, tok, ids, 8)[0], skip_special_tokens=True)
            differ += want != tok.decode(hf_greedy(base, tok, ids, 8)[0], skip_special_tokens=True)
            reply = client.chat.completions.create(
                model="spin-iter-1", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=8
            )
            assert reply.choices[0].message.content == want, q
        assert differ  # the adapter, not the base model, answered
    finally:
        serve.shutdown()


def test_lora_job_on_a_real_model_exports_adapters_and_merged_and_resumes(ray_session, tmp_path, capsys):
    """The whole job with LoRA on SmolLM2-135M-Instruct (model.path=smollm2, greedy): iteration 1,
    then the same run dir with spin.iterations=2. The resumed job's engines start from p_1's adapter
    and its trainer from p_1 as policy and reference: the engines' log-probs of what they sample
    equal the trainer's p_1 ones, and their greedy answers are HF + PEFT greedy of that adapter."""
    from spin_ray.driver.console import header
    from spin_ray.driver.job import run_job
    from spin_ray.driver.prepare import prepare
    from spin_ray.smollm2 import smollm2_world
    from spin_ray.toy import read_jsonl
    from spin_ray.tracking import read_metrics

    world, out = smollm2_world(0), tmp_path / "run"
    for name, records in (("train", read_jsonl(world.train_path)[:8]), ("eval", read_jsonl(world.eval_path)[:2])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for iterations in (1, 2):
        overrides = [f"data.{name}_path={tmp_path / name}.jsonl" for name in ("train", "eval")]
        overrides += ["generation.temperature=0", "train.lora.export_merged=true", f"spin.iterations={iterations}"]
        cfg = load_config(
            ROOT / "configs" / "smollm2.yaml", [f"run.output_dir={out}", "run.wandb_mode=disabled", *overrides]
        )
        prepared = prepare(cfg)
        run_job(cfg, prepared)
    console = capsys.readouterr().out
    assert "a LoRA adapter, r=16 on all-linear: 4,884,480 of 134,515,008 parameters" in header(cfg, prepared)
    assert "[resume] iterations 1..1 are done" in console
    rows = {r["iteration"]: r for r in read_metrics(out) if "train/loss" in r}
    adapter_bytes = sum(f.stat().st_size for f in (out / "iter_1" / "model").glob("adapter_*"))
    assert rows[1]["sync/bytes"] == adapter_bytes and rows[1]["train/trainable_params"] == 4_884_480
    assert rows[2]["gen/logprob_mismatch"] < 1e-4  # engines and trainer resumed on the same p_1
    for t in (1, 2):
        assert (out / f"iter_{t}" / "model" / "adapter_model.safetensors").exists()
        assert (out / f"iter_{t}" / "merged" / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(world.model_dir)
    pairs = pq.read_table(out / "iter_2" / "pairs").to_pylist()
    prompts, max_tokens = [r["prompt_ids"] for r in pairs], cfg.generation.max_tokens
    p1 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.model_dir), out / "iter_1" / "model")
    assert [r["generated_ids"] for r in pairs] == hf_greedy(p1.eval(), tok, prompts, max_tokens)
    merged = AutoModelForCausalLM.from_pretrained(out / "iter_1" / "merged").eval()
    assert hf_greedy(merged, tok, prompts, max_tokens) == [r["generated_ids"] for r in pairs]
