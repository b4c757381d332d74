"""Every benchmark script still runs, at its smallest size: an API change breaks this test, not the
next user's benchmark. Nothing is timed here; the scripts print their own ratios. These runs take
25 minutes on 2 cores, so they are a tier of their own (`pytest -m bench`), outside the default run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALLEST = {
    "generation": [
        "--prompts",
        "16",
        "--new-tokens",
        "4",
        "--batch-sizes",
        "16",
        "--repeats",
        "1",
        "--swap-models",
        "tiny",
    ],
    "training": ["--rounds", "2"],
    "weight_sync": ["--sizes", "10"],
    "serving": ["--rounds", "2", "--requests", "4", "--concurrency", "1", "--new-tokens", "4"],
    "iteration-curve": ["curve", "--sizes", "64"],
    "iteration-official": ["official", "spin.iterations=1"],
    "iteration-official-smollm2": [
        "official",
        "--config",
        "configs/smollm2.yaml",
        "spin.iterations=1",
        "data.max_examples=8",
    ],
    "real_model-generation": ["generation", "--prompts", "8", "--rounds", "1"],
    "real_model-training": ["training", "--pairs", "8", "--rounds", "1"],
    "real_model-job": ["job", "spin.iterations=1", "data.max_examples=8"],
    "soak": ["--iterations", "2"],
    "lora": ["--layers", "1", "--pairs", "8", "--tokens", "16", "--swaps", "1", "--toy-iterations", "1"],
}


def test_every_script_has_a_smoke_run():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"models"}  # models.py: shared helpers
    assert scripts == {name.split("-")[0] for name in SMALLEST}


@pytest.mark.e2e
@pytest.mark.bench
@pytest.mark.parametrize("name", SMALLEST)
def test_benchmark_runs_at_its_smallest_size(name):
    script = ROOT / "benchmarks" / f"{name.split('-')[0]}.py"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each script starts its own Ray
    proc = subprocess.run(
        [sys.executable, str(script), *SMALLEST[name]], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, (
        f"{script.name} {' '.join(SMALLEST[name])} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    )
