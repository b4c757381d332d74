"""The whole job end to end on the toy world: few, expensive runs, many assertions each."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from helpers import N_PROMPTS, free_port, run_notebook
from transformers import AutoModelForCausalLM, AutoTokenizer
from wandb_records import history

from spin_ray.comparison import load
from spin_ray.config import load_config
from spin_ray.driver.job import start_coordinator
from spin_ray.report import load_run
from spin_ray.tracking import read_metrics

ROOT = Path(__file__).resolve().parent.parent
METRICS = [
    "train/loss",
    "train/rewards/real",
    "train/rewards/generated",
    "train/rewards/margins",
    "train/rewards/accuracies",
    "train/rewards/accuracies_distinct",
    "train/rewards/margins_distinct",
    "train/pairs/identical",
    "train/lengths/real",
    "train/lengths/generated",
    "train/logps/real",
    "train/logps/generated",
    "eval/logps/real",
    "eval/accuracy",
    "gen/tokens_per_s",
    "gen/seconds",
    "train/seconds",
    "sync/seconds",
    "time/iteration_s",
]


@pytest.fixture(scope="module")
def run(toy_run):
    return toy_run


def test_artifacts_and_engines_started_once(run):
    out, first, second = run
    # replacements first: a failure then names the cause
    assert first["engine_replacements"] == second["engine_replacements"] == []
    assert first["trainer_restarts"] == second["trainer_restarts"] == []
    assert first["engine_starts"] == 1 and second["engine_starts"] == 1
    assert [r["iteration"] for r in second["history"]] == [2, 3]  # resumed: start = p_2, then iteration 3
    assert (out / "config.yaml").exists() and (out / "summary.json").exists()
    assert not (out / "ray_train" / "spin-train" / "iter_1").exists()  # no optimizer state nobody reads
    # The tokenized training set is on disk, read in batches; the ordered prompts were temporary.
    assert pq.read_table(out / "data" / "train.parquet").num_rows == N_PROMPTS
    assert not list(out.glob("iter_*/prompts.tmp")) and not list(out.glob("data/*.tmp"))
    for t in (1, 2, 3):
        pairs = pq.read_table(out / f"iter_{t}" / "pairs")
        # One pair per record: repeated prompts and exactly equal records are kept, each its own uid.
        assert pairs.num_rows == N_PROMPTS and len(set(pairs["uid"].to_pylist())) == N_PROMPTS
        assert {"uid", "prompt", "real", "generated"} <= set(pairs.column_names)
        assert (out / f"iter_{t}" / "model" / "model.safetensors").exists()


def test_every_checkpoint_has_a_model_card_with_its_held_out_metrics(run, toy):
    from huggingface_hub import ModelCard

    out, first, second = run
    rows = {r["iteration"]: r for r in first["history"] + second["history"]}
    for t in (1, 2, 3):
        card = ModelCard.load(out / f"iter_{t}" / "model" / "README.md")
        assert card.data.base_model == str(toy.model_dir) and card.data.library_name == "transformers"
        assert card.data.tags == ["spin", "self-play", "spin-ray"]
        accuracy = [f"{rows[i]['eval/accuracy']:.4g}" for i in range(t + 1)]  # p_0 ... p_t
        assert f"| eval/accuracy | {' | '.join(accuracy)} |" in card.text
        assert f"python jobs/spin.py --config {out / 'config.yaml'}" in card.text


def test_each_iteration_generates_with_the_swapped_weights(run, toy):
    """Greedy pairs of iteration t+1 are exactly HF greedy decoding of iter_<t>/model (p_t)."""
    out, _, _ = run
    tok = AutoTokenizer.from_pretrained(toy.model_dir)
    for t in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(out / f"iter_{t}" / "model", dtype=torch.float32).eval()
        pairs = pq.read_table(out / f"iter_{t + 1}" / "pairs").to_pylist()
        for row in pairs[:16]:
            p = row["prompt_ids"]
            ids = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p) :].tolist()
            ids = ids[: ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids
            assert row["generated_ids"] == ids, (t, row["uid"])
        previous = pq.read_table(out / f"iter_{t}" / "pairs").column("generated").to_pylist()
        assert previous != [r["generated"] for r in pairs]  # the weights did change


def test_metrics_jsonl_and_wandb(run):
    out, _, _ = run
    lines = read_metrics(out)
    rows = [x for x in lines if "global_step" in x]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for key in METRICS:
        assert all(key in r for r in rows), key
    assert any("train/lr" in x for x in lines)  # per-log-step training lines
    # The held-out metrics, and the user's hook on every checkpoint; the failing hook changed nothing.
    for key in ("eval/self_preference", "eval/exact_match", "eval/distinct_2", "eval/length/generated"):
        assert all(0 <= r[key] <= 8 for r in rows), key
    assert [(r["eval/checkpoint/iteration"], r["eval/checkpoint/has_weights"]) for r in rows] == [
        (1, 1.0),
        (2, 1.0),
        (3, 1.0),
    ]
    assert not any(k.startswith("eval/broken") for x in lines for k in x)
    # Iteration 1 trains on its own pairs only, once: its means are theirs (48 pairs go out as a
    # step of 32 and one of 16, each weighed by its pairs).
    pairs = pq.read_table(out / "iter_1" / "pairs").to_pylist()
    identical = sum(p["real_ids"] == p["generated_ids"] for p in pairs) / len(pairs)
    assert rows[0]["train/pairs/identical"] == pytest.approx(identical, abs=1e-6)
    assert rows[0]["train/lengths/real"] == pytest.approx(np.mean([len(p["real_ids"]) for p in pairs]), abs=1e-4)
    # The engines sampled with exactly the weights training holds as p_{t-1} (fp32 both sides).
    assert all(r["gen/logprob_mismatch"] < 1e-3 and r["gen/logprob_mismatch_max"] < 1e-2 for r in rows), rows
    logged = history(out)
    for key in METRICS:
        assert any(key in r for r in logged), key
    assert [r["iteration"] for r in logged if "global_step" in r] == [1, 2, 3]  # one run across the resume


def test_lm_eval_in_the_job_gives_its_own_accuracy_with_no_engine_of_its_own(run):
    """The toy's held-out sums as an lm-eval generate_until task (chat template, exact match),
    run by the job's engines on p_0 .. p_3: the same accuracy as the job's own eval_acc. The job
    started its engine once per submission (test_artifacts_and_engines_started_once), lm-eval
    included; the report shows the task."""
    out, first, second = run
    rows = [r for r in read_metrics(out) if "eval/accuracy" in r]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    key = "eval/lm_eval/spin_toy_addition/exact_match"
    assert [r[key] for r in rows] == pytest.approx([r["eval/accuracy"] for r in rows], abs=1e-9)
    assert len({r[key] for r in rows}) > 1  # the iterations' models differ
    assert first["engine_starts"] == second["engine_starts"] == 1
    assert key in (out / "report.html").read_text()


def test_compare_and_report_read_the_real_run(run):
    """The readers of metrics.jsonl agree with what the job really writes: an iteration row per
    iteration (0 = the start model), with the held-out metrics."""
    out, _, _ = run
    result = load(out)
    assert sorted(result.rows) == [0, 1, 2, 3] and all("eval/accuracy" in row for row in result.rows.values())
    assert list(load_run(out).iterations["iteration"]) == [0, 1, 2, 3]


def own_and_child_environment(coordinator) -> tuple[str | None, bytes]:
    """Run in the coordinator: its W&B key, and the environment of a task it starts."""
    child = ray.remote(num_cpus=0)(lambda: Path("/proc/self/environ").read_bytes())
    return os.environ.get("WANDB_API_KEY"), ray.get(child.remote())


def test_the_wandb_key_reaches_the_coordinator_alone(ray_session, tmp_path, monkeypatch):
    """An online run's W&B key is the coordinator's (it runs W&B), not in its runtime_env: Ray
    would hand that to every process it starts (the engines, the train workers, Ray Data's tasks)."""
    key = "spin-ray-test-key-" + "7" * 22
    monkeypatch.setenv("WANDB_API_KEY", key)
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}"])  # run.wandb_mode=auto: online with a key
    prepared = SimpleNamespace(train=SimpleNamespace(fingerprint="-"), inputs={})  # what the constructor reads
    coordinator = start_coordinator(cfg, prepared)
    try:
        own, child = ray.get(coordinator.__ray_call__.remote(own_and_child_environment))
    finally:
        ray.kill(coordinator)
    assert own == key
    assert key.encode() not in child and b"PYTHONPATH=" in child  # the job's own variables do reach it


def test_resume_with_changed_settings_is_refused_before_ray(run, toy):
    out, _, _ = run
    changed = ["train.lr=2e-3", f"model.path={toy.model_dir}", f"data.train_path={toy.train_path}"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "spin.py"), f"run.output_dir={out}", *changed],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    for key in ("train.lr: 0.001 -> 0.002", "model.path: 'toy' -> ", "data.train_path: ", "run.allow_config_change"):
        assert key in proc.stderr
    assert "spin.iterations" not in proc.stderr  # operational keys may change
    assert "Started a local Ray" not in proc.stdout + proc.stderr


def test_notebook_executes(run):
    out, _, _ = run
    nb = run_notebook(out)
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.e2e
def test_ray_job_submit_against_a_local_head(tmp_path):
    """`ray job submit -- python jobs/spin.py` against our own head, on its own ports and temp dir."""
    bin_dir = Path(sys.executable).parent
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env["RAY_worker_maximum_startup_concurrency"] = "6"  # as the job's own local Ray: one per logical CPU
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path("/tmp") / f"spinray-{os.getpid()}"  # short: Ray's socket paths have a length limit
    gcs_port = free_port()
    head = subprocess.Popen(
        [
            bin_dir / "ray",
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            "--dashboard-port=8265",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
            "--num-cpus=6",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        out = tmp_path / "run"
        for _ in range(60):
            ok = (
                subprocess.run(
                    [bin_dir / "ray", "job", "list", "--address", "http://127.0.0.1:8265"], env=env, capture_output=True
                ).returncode
                == 0
            )
            if ok:
                break
            time.sleep(2)
        proc = subprocess.run(
            [
                bin_dir / "ray",
                "job",
                "submit",
                "--address",
                "http://127.0.0.1:8265",
                "--working-dir",
                str(ROOT),
                "--",
                "python",
                "jobs/spin.py",
                "spin.iterations=2",
                f"data.max_examples={N_PROMPTS}",
                f"run.output_dir={out}",
                "run.wandb_mode=disabled",
                # the reference and sync paths the in-process run above does not take
                "spin.reference=engines",
                "sync.method=broadcast",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["engine_starts"] == 1 and len(summary["history"]) == 3
        assert all(row["sync/bytes"] > 100_000 for row in summary["history"][1:])
        # The console: progress per phase, nothing the libraries print; that is all in logs/.
        console = proc.stdout
        # (spin.reference=engines scores inside the stream: no phase of its own)
        for label in ("[0/2] start-up", "[p_0] eval", "[1/2] generate", "[1/2] train", "[1/2] export", "[1/2] sync"):
            assert f"{label} " in console, label
        assert "[2/2] done in" in console and "report:" in console
        assert len(console.splitlines()) < 60, console
        assert "pid=" not in console and "Dataset" not in console and "WARNING" not in console, console
        logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
        everything = "".join(logs.values())
        for library_line in ("Starting execution of Dataset", "Loading safetensors checkpoint shards", "world_rank=1"):
            assert library_line in everything, library_line
        (rank0,) = [text for name, text in logs.items() if name.startswith("train-rank0-")]
        train_lines = [line for line in rank0.splitlines() if line.startswith("[train] iteration")]
        assert train_lines and len(train_lines) == len(set(train_lines))  # each once
        assert (out / "report.html").exists()
        serve_on_the_head(out, env | {"RAY_ADDRESS": f"127.0.0.1:{gcs_port}"})
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # stop our head by its process group, never `ray stop`
        head.wait(timeout=60)


def serve_on_the_head(out: Path, env: dict[str, str]) -> None:
    """The run served as on the cluster that trained it, two ways: `RAY_ADDRESS=<head> python
    jobs/serve.py RUN_DIR` (it joins the head, no num_cpus of its own), then the RayService's Serve
    config (deploy/kuberay/rayservice.yaml) sent to the head's dashboard, as KubeRay does. Both
    answer from p_2 and list its model card's line."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "serve.py"), str(out), "--port", str(port), "serve.max_tokens=8"],
        env=env,
        start_new_session=True,
        stdout=(log := (out.parent / "serve.log").open("w")),  # a pipe nobody reads would fill and block it
        stderr=subprocess.STDOUT,
    )
    try:
        answers_from_p2(f"http://127.0.0.1:{port}/v1", lambda: server.poll() is None)
    finally:
        server.send_signal(signal.SIGTERM)  # it shuts Serve down on the head, which lives on
        server.wait(timeout=120)
        log.close()
    libraries = (out / "logs" / "serve.log").read_text()[-3000:] if (out / "logs" / "serve.log").exists() else ""
    assert server.returncode == 0, Path(log.name).read_text() + libraries
    service = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"] |= {"path": str(out), "overrides": ["serve.max_tokens=8"]}
    (file := out.parent / "serve-config.yaml").write_text(yaml.safe_dump(config))
    serve_cli = Path(sys.executable).parent / "serve"
    subprocess.run([serve_cli, "deploy", file, "-a", "http://127.0.0.1:8265"], env=env, check=True, timeout=120)
    try:
        answers_from_p2(f"http://127.0.0.1:{port}/v1", lambda: True)
    finally:
        subprocess.run([serve_cli, "shutdown", "-y", "-a", "http://127.0.0.1:8265"], env=env, timeout=120)


def answers_from_p2(url: str, alive) -> None:
    import httpx

    models = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and alive():
        try:
            models = httpx.get(f"{url}/models", timeout=10)
            if models.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    assert alive() and models is not None and models.status_code == 200, f"{url} did not come up on the head"
    (listed,) = models.json()["data"]
    assert listed["id"] == "spin-iter-2" and listed["summary"].startswith("Iteration 2 of SPIN"), listed
    body = {"model": "spin-iter-2", "messages": [{"role": "user", "content": "12+34="}], "max_tokens": 8}
    reply = httpx.post(f"{url}/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"], reply.text
