"""The same-compute SFT baseline, the held-out metrics and hooks, and the comparison of runs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from spin_ray.comparison import ComparisonError, check_comparable, format_table, load, summarize
from spin_ray.config import load_config
from spin_ray.data import pad_pairs
from spin_ray.driver.prepare import prepare
from spin_ray.loop.coordinator import Coordinator
from spin_ray.loop.generate import write_prompts
from spin_ray.loss import sequence_logps, sft_loss
from spin_ray.metrics import answer_metrics, distinct_n, load_hooks, run_hooks

ROOT = Path(__file__).resolve().parent.parent


def test_sft_loss_is_the_token_mean_nll_of_the_real_answers():
    g = torch.Generator().manual_seed(0)
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 15]]
    batch = pad_pairs(prompts, responses, pad_id=0)
    logits = torch.randn(*batch["input_ids"].shape, 20, generator=g)
    loss = sft_loss(sequence_logps(logits, batch["input_ids"], batch["response_mask"]), torch.tensor([2, 4]))
    logp = logits.log_softmax(-1)
    # By hand: each response token is predicted by the position before it.
    by_hand = [logp[0, 2, 10], logp[0, 3, 11], logp[1, 1, 12], logp[1, 2, 13], logp[1, 3, 14], logp[1, 4, 15]]
    assert loss.item() == pytest.approx(-sum(x.item() for x in by_hand) / 6, abs=1e-6)


def test_sft_arm_trains_on_the_same_rows_in_the_same_order(toy, tmp_path):
    """Iteration t's stream: SPIN's pairs of t and t-1 and the SFT arm's real answers are the same
    prompts and real answers, step for step and rank for rank, so both take the same steps."""
    steps = {}
    for arm in ("spin", "sft"):
        out = tmp_path / arm
        cfg = load_config(ROOT / "configs" / "toy.yaml", [f"run.output_dir={out}", f"spin.objective={arm}"])
        coordinator = Coordinator(cfg, prepare(cfg))
        for t in (1, 2, 3):  # pairs as the engines leave them: iteration t's prompt files plus y'
            parts = write_prompts(coordinator.p.train, cfg.run.seed, t, out / "prompts" / str(t), 128)
            (out / f"iter_{t}" / "pairs").mkdir(parents=True)
            for part in parts:
                table = pq.read_table(part)
                generated = pa.array([[t, 2]] * table.num_rows)
                pq.write_table(table.append_column("generated_ids", generated), out / f"iter_{t}" / "pairs" / part.name)
        steps[arm] = [list(coordinator.training_set(t, None, None).steps(2)) for t in (1, 2, 3)]
    columns = ["uid", "prompt_ids", "real_ids"]
    for spin, sft in zip(steps["spin"], steps["sft"], strict=True):
        assert len(spin) == len(sft)
        for spin_step, sft_step in zip(spin, sft, strict=True):
            for spin_rank, sft_rank in zip(spin_step, sft_step, strict=True):
                assert sft_rank.column_names == columns and spin_rank.select(columns).equals(sft_rank)
    assert [sum(r.num_rows for step in it for r in step) for it in steps["sft"]] == [500, 1000, 1000]  # mix_previous=1


def test_held_out_metrics_on_known_answers():
    metrics = answer_metrics(
        real_logps=np.array([-1.0, -2.0, -3.0, -4.0]),
        sampled_logps=np.array([-2.0, -1.0, -5.0, -4.5]),
        real_ids=[[1, 2], [3], [4, 5, 6], [7]],
        sampled_ids=[[1, 1, 1], [1, 2], [3], [9, 9]],
        greedy=["46 ", "1", "abc", "x"],
        real=["46", "2", "abc", "y"],
    )
    assert metrics == {
        "eval/logps/real": -2.5,
        "eval/logps/generated": -3.125,
        "eval/self_preference": 0.75,
        "eval/length/real": 1.75,
        "eval/length/generated": 2.0,
        "eval/distinct_1": 4 / 8,
        "eval/distinct_2": 3 / 4,  # (1,1) (1,1) (1,2) (9,9)
        "eval/exact_match": 0.5,
    }
    assert distinct_n([[1, 2, 3]], 4) == 0.0


def test_hooks_load_by_name_report_failures_and_go_on(capsys):
    with pytest.raises(ValueError, match=r"eval.hooks\[1\] = 'json:no_such_function'"):
        load_hooks(["json:dumps", "json:no_such_function"])
    hooks = load_hooks(["math:hypot", "json:loads"])  # hypot(dir, t) fails: a broken user hook
    hooks.append(("lengths", lambda path, t: {"chars": len(path), "t": t}))
    said = []
    assert run_hooks(hooks, "ckpt", 2, said.append) == {"eval/lengths/chars": 4.0, "eval/lengths/t": 2.0}
    assert len(said) == 2 and "hook hypot failed on iteration 2" in said[0] and "TypeError" in said[0]


def fake_run(root: Path, arm: str, seed: int, accuracy: list[float], **config) -> Path:
    out = root / f"{arm}-{seed}"
    out.mkdir()
    tree = {
        "model": {"path": "m"},
        "data": {"train_path": "d.jsonl"},
        "spin": {"objective": arm},
        "run": {"seed": seed},
    }
    for dotted, value in config.items():
        section, key = dotted.split("__")
        tree.setdefault(section, {})[key] = value
    (out / "config.yaml").write_text(yaml.safe_dump(tree))
    (out / "data_fingerprint").write_text("abc")
    lines = [{"step": 0, "iteration": 0, "eval/accuracy": accuracy[0]}]
    lines += [{"step": 8 * t, "iteration": t, "train/lr": 1e-5, "train/loss": 0.6} for t in (1, 2)]
    lines += [{"step": 8 * t, "iteration": t, "global_step": 8 * t, "eval/accuracy": accuracy[t]} for t in (1, 2)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out


def test_compare_arms_across_seeds(tmp_path):
    runs = [
        fake_run(tmp_path, "spin", 0, [0.5, 0.6, 0.7]),
        fake_run(tmp_path, "spin", 1, [0.4, 0.6, 0.8]),
        fake_run(tmp_path, "sft", 0, [0.5, 0.5, 0.6]),
        fake_run(tmp_path, "sft", 1, [0.4, 0.6, 0.6]),
    ]
    summary = summarize([load(r) for r in runs]).set_index(["group", "iteration"])
    assert summary.loc[("spin", 2), "mean"] == pytest.approx(0.75)
    assert summary.loc[("spin", 2), "std"] == pytest.approx(math.sqrt(0.005))
    assert summary.loc[("spin - sft", 2), "mean"] == pytest.approx(0.15)  # paired: (0.1 + 0.2) / 2
    assert summary.loc[("spin - sft", 1), "n"] == 2
    assert "+0.1500±0.0707" in format_table(summarize([load(r) for r in runs]))

    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "compare.py"), *map(str, runs), "--out", str(tmp_path / "cmp")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "spin - sft (2 seeds, paired)" in proc.stdout
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000 and (tmp_path / "cmp" / "compare.html").exists()


def test_compare_refuses_other_models_or_data_naming_the_keys(tmp_path):
    a = fake_run(tmp_path, "spin", 0, [0.5, 0.6, 0.7])
    b = fake_run(tmp_path, "sft", 0, [0.5, 0.6, 0.7], model__path="other", train__lr=1.0)
    with pytest.raises(ComparisonError, match=r"model.path: 'm' .* vs 'other'"):
        check_comparable([load(a), load(b)])
    c = fake_run(tmp_path, "sft", 1, [0.5, 0.6, 0.7], train__lr=1.0)
    assert check_comparable([load(a), load(c)]) == ["train.lr"]  # noted, not refused
    (c / "data_fingerprint").write_text("changed")
    with pytest.raises(ComparisonError, match="data_fingerprint"):
        check_comparable([load(a), load(c)])


def test_compare_per_seed_allows_a_p0_per_seed_only(tmp_path):
    runs = [
        fake_run(tmp_path, arm, seed, [0.5, 0.6, 0.7], model__path=f"p0-s{seed}")
        for seed in (0, 1)
        for arm in ("spin", "sft")
    ]
    with pytest.raises(ComparisonError, match="--per-seed"):
        check_comparable([load(r) for r in runs])
    assert check_comparable([load(r) for r in runs], per_seed=True) == []
    odd = fake_run(tmp_path / "..", "sft", 1, [0.5, 0.6, 0.7], model__path="p0-s0")  # seed 1's SFT from seed 0's p_0
    with pytest.raises(ComparisonError, match="model.path: 'p0-s1'"):
        check_comparable([load(r) for r in [*runs[:3], odd]], per_seed=True)
