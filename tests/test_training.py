"""The long-lived Ray Train + DeepSpeed trainer: exact first-step loss, export, same workers throughout."""

import math

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spin_ray.config import load_config
from spin_ray.data import load_sft, pad_pairs
from spin_ray.loss import sequence_logps
from spin_ray.training import Trainer


@pytest.fixture(scope="module")
def pairs(toy) -> pa.Table:
    """16 toy pairs whose 'generated' side is another example's answer (a plausible wrong one)."""
    tok = AutoTokenizer.from_pretrained(toy.model_dir)
    ex = load_sft(toy.train_path, tok, max_prompt_tokens=64, max_response_tokens=16, max_examples=16)
    return pa.Table.from_pylist(
        [
            {
                "uid": e.uid,
                "prompt_ids": e.prompt_ids,
                "real_ids": e.real_ids,
                "generated_ids": ex[(i + 1) % 16].real_ids,
            }
            for i, e in enumerate(ex)
        ]
    )


def hf_logps(model_dir, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = table.to_pylist()
    batch = pad_pairs(
        [r["prompt_ids"] for r in rows] * 2,
        [r["real_ids"] for r in rows] + [r["generated_ids"] for r in rows],
        pad_id=0,
    )
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = sequence_logps(logits, batch["input_ids"], batch["response_mask"]).numpy()
    return logps[: len(rows)], logps[len(rows) :]


def make_trainer(toy, tmp_path, *overrides):
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "train.num_workers=2",
            "train.batch_size=8",
            "train.log_every=1",
            "train.lr=1e-3",
            "train.optimizer=adamw",
            *overrides,
        ],
    )
    return Trainer(cfg, str(toy.model_dir))


def test_zero3_exact_first_step_export_and_same_workers(ray_session, toy, pairs, tmp_path):
    trainer = make_trainer(toy, tmp_path, "train.zero_stage=3", "train.epochs=2")
    try:
        first = trainer.train(0, ray.data.from_arrow(pairs))
        step1 = first["logs"][0]
        real, generated = hf_logps(toy.model_dir, pairs)
        # 16 pairs, 8 per rank, one micro batch each: step 1 sees every pair, policy == reference.
        assert step1["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert step1["logps/real"] == pytest.approx(real.mean(), abs=1e-5)
        assert step1["logps/generated"] == pytest.approx(generated.mean(), abs=1e-5)
        assert step1["rewards/margins"] == 0
        assert first["logs"][1]["loss"] < math.log(2)  # step 2 moved away from the reference

        trainer.export(0, tmp_path / "iter_0" / "model")
        trained = trainer.score(pairs)
        exported_real, exported_gen = hf_logps(tmp_path / "iter_0" / "model", pairs)
        got = np.array([trained[u] for u in pairs["uid"].to_pylist()])
        np.testing.assert_allclose(got[:, 0], exported_real, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got[:, 1], exported_gen, atol=1e-5, rtol=0)
        assert np.abs(exported_real - real).max() > 1e-3  # training changed the weights

        second = trainer.train(1, ray.data.from_arrow(pairs))
        # The reference is now the exported p_1: the first step of iteration 2 is log(2) again.
        assert second["logs"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert second["logs"][0]["logps/real"] == pytest.approx(exported_real.mean(), abs=1e-5)
        assert {first["pid"], second["pid"]} <= set(trainer.pids) and len(set(trainer.pids)) == 2
        assert (tmp_path / "ray_train" / "spin-train" / "iter_0").is_dir()  # DeepSpeed checkpoint for resume
    finally:
        trainer.stop()


def test_zero2_engine_reference_odd_pairs_same_workers(ray_session, toy, pairs, tmp_path):
    real, generated = hf_logps(toy.model_dir, pairs)
    odd = pairs.slice(0, 7)
    with_ref = odd.append_column("ref_real_logps", pa.array(real[:7])).append_column(
        "ref_generated_logps", pa.array(generated[:7])
    )
    trainer = make_trainer(toy, tmp_path, "train.zero_stage=2", "spin.reference=engines", "train.batch_size=2")
    try:
        pids = set(trainer.pids)
        for t in range(2):
            result = trainer.train(t, ray.data.from_arrow(with_ref))  # 7 pairs on 2 ranks: no hang
            assert result["steps"] == 2 and result["pid"] in pids  # 3 pairs per rank, batches of 2
        assert set(trainer.pids) == pids
    finally:
        trainer.stop()
