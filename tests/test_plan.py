"""The dry run: the plan's numbers, in seconds, with nothing started (no Ray, no engine, no trainer)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import LLAMA_7B, shaped_model
from transformers import AutoModelForCausalLM

from spin_ray.config import load_config
from spin_ray.driver import estimate, placement, plan
from spin_ray.driver.prepare import prepare

ROOT = Path(__file__).resolve().parent.parent
LLAMA_70B = {
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "intermediate_size": 28672,
    "vocab_size": 32000,
}
# The README's 7B setting, on 8 training GPUs and 4 engines of one GPU each.
GPU_SETTING = [
    "model.dtype=bfloat16",
    "generation.num_gpus=1",
    "generation.num_engines=4",
    "train.use_gpu=true",
    "train.num_workers=8",
    "train.zero_stage=3",
    "train.batch_size=8",
    "train.gradient_checkpointing=true",
    "data.max_prompt_tokens=512",
    "data.max_response_tokens=512",
]
GIB = 2**30


def run_dry(*overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # this machine, not a cluster
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "spin.py"), "--dry-run", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return proc, time.perf_counter() - start


@pytest.fixture
def on_gpu_node(monkeypatch):
    """dry_run() on one node with `gpus` GPUs of 80 GiB instead of this machine."""

    def use(gpus: int) -> None:
        node = {"CPU": 8.0 * gpus, "GPU": float(gpus)}
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setattr(
            plan,
            "local_cluster",
            lambda cfg: placement.Cluster("a test node", [node], gpu_gib=80.0, gpu_source="the test"),
        )

    return use


@pytest.fixture(scope="module")
def model_7b(toy, tmp_path_factory):
    return shaped_model(tmp_path_factory.mktemp("llama7b"), toy, LLAMA_7B)


@pytest.fixture(scope="module")
def model_70b(toy, tmp_path_factory):
    return shaped_model(tmp_path_factory.mktemp("llama70b"), toy, LLAMA_70B)


def shaped_config(model_dir: Path, tmp_path: Path, *overrides: str):
    base = [f"model.path={model_dir}", f"data.train_path={model_dir / 'train.jsonl'}", f"run.output_dir={tmp_path}"]
    return load_config(ROOT / "configs" / "toy.yaml", [*base, *GPU_SETTING, *overrides])


def test_toy_dry_run_prints_the_plan(toy, tmp_path):
    proc, seconds = run_dry(f"run.output_dir={tmp_path / 'run'}")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    # configs/toy.yaml: 500 prompts, 2 workers x 16 pairs, mix_previous 1. Iteration 1 has 250 pairs
    # per rank (ceil(250/16) = 16 steps), iterations 2 and 3 also the previous pairs: 500 per rank.
    assert "iter 1     500 pairs, 250 per rank: 16 micro, 16 optimizer steps" in out
    assert "iter 2-3   1,000 pairs, 500 per rank: 32 micro, 32 optimizer steps" in out
    model = AutoModelForCausalLM.from_pretrained(toy.model_dir)
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in out  # 138,048: tied once
    assert "<= 4,000 tokens per iteration (500 x 8)" in out
    assert "engines      1 x {CPU 0.5} = {CPU 0.5}: OK" in out
    assert "workers      2 x {CPU 1} = {CPU 2}: OK" in out
    assert out.rstrip().endswith("(exit 0)") and "WARN:" not in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    print(f"toy dry run: {seconds:.1f} s")
    assert seconds < 60  # ~6 s on 2 cores; the bound only guards against starting Ray or engines


def test_7b_shape_dry_run_without_weights(model_7b, tmp_path):
    assert not list(model_7b.glob("*.safetensors"))
    overrides = [f"model.path={model_7b}", f"data.train_path={model_7b / 'train.jsonl'}", *GPU_SETTING]
    proc, seconds = run_dry(*overrides, f"run.output_dir={tmp_path / 'run'}")
    out = proc.stdout
    assert proc.returncode in (0, 1), out + proc.stderr
    assert "6,738,415,616 parameters (6.74B)" in out  # Llama-2-7B's count
    assert "GPU          80 GiB per GPU, assumed" in out or torch.cuda.is_available()
    if torch.cuda.device_count() < 12:  # 4 engines + 8 workers want 12 GPUs
        assert "WARN: cannot be placed: needs {CPU 2, GPU 4}" in out
        assert proc.returncode == 1 and "NOT OK: engines cannot be placed; workers cannot be placed" in out
    print(f"7B dry run: {seconds:.1f} s")
    assert seconds < 60


def test_7b_lora_fits_one_80gb_gpu_with_adapter_only_states(model_7b, tmp_path, on_gpu_node, capsys):
    one_gpu = ("generation.num_engines=1", "train.num_workers=1", "train.zero_stage=2", "train.optimizer=adamw")
    cfg = shaped_config(model_7b, tmp_path, *one_gpu, "train.lora.r=16")
    shape = estimate.model_shape(str(model_7b), cfg.train.lora)
    p, lora = 6_738_415_616, 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # r x (in + out) per linear layer
    assert (shape.params, shape.trainable) == (p, lora) and lora == 39_976_960  # PEFT's count: 40.0M
    memory = estimate.training_memory(cfg, shape)
    assert memory["base weights"] == 2 * p  # bf16, frozen, no grads, no optimizer states
    assert memory["adapter states"] == 20 * lora  # DeepSpeed's ZeRO-2 formula (2 + 18 bytes) on the adapter only
    assert memory["reference"] == 2 * lora  # a snapshot of the adapter, not a second model
    on_gpu_node(2)  # the trainer's GPU and the engine's
    assert plan.dry_run(cfg, prepare(cfg, dry_run=True)) == 0
    out = capsys.readouterr().out
    assert "adapter states" in out and "39,976,960 trainable (LoRA r=16)" in out


def test_7b_memory_matches_deepspeed(model_7b, tmp_path):
    shape = estimate.model_shape(str(model_7b))
    p = 6_738_415_616
    assert (shape.params, shape.largest_layer) == (p, 32000 * 4096)  # the embedding is the largest layer
    cfg = shaped_config(model_7b, tmp_path, "train.optimizer=adamw", "train.zero_stage=2")
    states = estimate.training_memory(cfg, shape)["model states"]
    assert states == 2 * p + int(18 * p / 8)  # DeepSpeed's ZeRO-2 formula: bf16 + Adam, unchanged
    assert states / GIB == pytest.approx(26.7, abs=0.1)
    cfg = shaped_config(model_7b, tmp_path, "train.optimizer=rmsprop", "train.zero_stage=2")
    assert estimate.training_memory(cfg, shape)["model states"] == pytest.approx(states - 4 * p / 8)  # 1 state, not 2
    cfg = shaped_config(model_7b, tmp_path, "train.optimizer=adamw", "train.zero_stage=3")
    memory = estimate.training_memory(cfg, shape)
    assert memory["model states"] == 4 * 32000 * 4096 + int(18 * p / 8)  # 14.6 GiB
    assert memory["reference"] == 2 * p / 8  # bf16, partitioned over 8 ranks
    # 2 x 8 sequences x 1024 tokens: checkpointed layer inputs (32 layers) plus one layer in full.
    tokens = 16 * 1024
    assert memory["activations"] == 32 * 2 * 4096 * tokens + 34 * 4096 * tokens
    assert 20 * GIB < sum(memory.values()) < 30 * GIB


def test_7b_fits_eight_80gib_gpus(model_7b, tmp_path, on_gpu_node, capsys):
    cfg = shaped_config(model_7b, tmp_path)
    on_gpu_node(12)
    assert plan.dry_run(cfg, prepare(cfg, dry_run=True)) == 0
    out = capsys.readouterr().out
    assert "engines      4 x {CPU 0.5, GPU 1} = {CPU 2, GPU 4}: OK" in out
    assert "workers      8 x {CPU 1, GPU 1} = {CPU 8, GPU 8}: OK" in out
    assert "WARN:" not in out and "verdict      OK" in out


@pytest.mark.parametrize("stage", [0, 2])
def test_70b_on_one_gpu_warns_and_exits_1(model_70b, tmp_path, on_gpu_node, capsys, stage):
    start = time.perf_counter()
    cfg = shaped_config(
        model_70b, tmp_path, "train.num_workers=1", "generation.num_engines=1", f"train.zero_stage={stage}"
    )
    on_gpu_node(2)
    assert plan.dry_run(cfg, prepare(cfg, dry_run=True)) == 1
    out = capsys.readouterr().out
    assert "68,976,648,192 parameters" in out
    assert "WARN: does not fit on one 80 GiB GPU" in out
    assert "WARN: weights exceed 0.85 x 80 GiB per GPU" in out  # 128 GiB of bf16 weights at TP 1
    assert "NOT OK: training does not fit in GPU memory; engine weights do not fit in GPU memory" in out
    assert time.perf_counter() - start < 30  # the 70B is never materialised


def test_sft_baseline_plans_no_generation_and_no_reference(model_7b, tmp_path, on_gpu_node, capsys):
    spin = shaped_config(model_7b, tmp_path, "train.zero_stage=2")
    sft = shaped_config(model_7b, tmp_path, "train.zero_stage=2", "spin.objective=sft")
    shape = estimate.model_shape(str(model_7b))
    spin_memory, sft_memory = estimate.training_memory(spin, shape), estimate.training_memory(sft, shape)
    assert "reference" in spin_memory and "reference" not in sft_memory
    assert sft_memory["activations"] == spin_memory["activations"] / 2  # one sequence per row, not two
    assert estimate.schedule(sft, 40) == estimate.schedule(spin, 40)  # the same steps, by design
    on_gpu_node(12)
    assert plan.dry_run(sft, prepare(sft, dry_run=True)) == 0
    assert "generate     nothing: spin.objective=sft" in capsys.readouterr().out


def test_schedule_ends_every_iteration_on_an_optimizer_step():
    cfg = load_config(ROOT / "configs" / "toy.yaml", ["train.grad_accum=3", "train.num_workers=3"])
    steps = estimate.schedule(cfg, 500)
    # 500 // 3 = 166 per rank -> 11 micro steps: 3 steps of 3 and one of 2; then 333 -> 21: 7 of 3.
    assert [(s.per_rank, s.micro_steps) for s in steps] == [(166, 11), (333, 21), (333, 21)]
    assert [s.optimizer_steps for s in steps] == [4, 7, 7]


def test_placement_with_the_autoscaler_of_cluster_yaml():
    launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = {"CPU": 8.0}
    kinds, max_new = placement.launcher_node_types(launcher, [head])
    assert {k.name: (k.resources["GPU"], k.more) for k in kinds} == {"gen_gpu": (4, 4), "train_gpu": (8, 4)}
    assert max_new == 8
    cluster = placement.Cluster("cluster.yaml", [head], kinds, max_new)
    cfg = load_config(
        None,
        ["generation.num_gpus=1", "generation.num_engines=6", "generation.resource=gen_gpu"]
        + ["train.use_gpu=true", "train.num_workers=16", "train.resource=train_gpu"],
    )
    outcome = placement.place(cluster, placement.groups(cfg))
    assert outcome == {
        "engines": (True, "OK, the autoscaler adds gen_gpu x2"),
        "workers": (True, "OK, the autoscaler adds train_gpu x2"),
    }
    cfg.train.num_workers = 40  # 5 train_gpu nodes, cluster.yaml allows 4
    placed, why = placement.place(cluster, placement.groups(cfg))["workers"]
    assert not placed
    assert why == (
        "WARN: cannot be placed: needs {CPU 40, GPU 40, train_gpu 40}, cluster has {CPU 101, GPU 2, train_gpu 0} "
        "+ up to {CPU 384, GPU 32, train_gpu 32} from the autoscaler (left after the engines)"
    )
    cfg.train.num_workers = 8
    cfg.generation.tensor_parallel_size = 8  # one engine wants 8 GPUs; gen_gpu nodes have 4
    placed, why = placement.place(cluster, placement.groups(cfg))["engines"]
    assert not placed and why.endswith("; no node holds one {CPU 0.5, GPU 8, gen_gpu 1}")
    # Without the autoscaler, the custom resource alone makes it unplaceable.
    placed, why = placement.place(placement.Cluster("head only", [head]), placement.groups(cfg))["workers"]
    assert not placed and "cluster has {CPU 8, GPU 0, train_gpu 0} (left after the engines)" in why


def test_running_nodes_count_against_the_autoscaler():
    launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    up = {"CPU": 96.0, "GPU": 8.0, "train_gpu": 8.0}
    kinds, max_new = placement.launcher_node_types(launcher, [{"CPU": 8.0}, up, dict(up)])
    assert {k.name: k.more for k in kinds} == {"gen_gpu": 4, "train_gpu": 2} and max_new == 6
