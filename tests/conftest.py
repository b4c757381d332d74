"""One Ray session and one toy world for the whole test run (each ray.init costs ~10 s)."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # throwaway local clusters
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def toy():
    from spin_ray.toy import toy_world

    return toy_world(0)


@pytest.fixture(scope="session")
def tok(toy):
    """The toy model's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy.model_dir)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # More logical CPUs than cores: engines and train workers mostly wait on each other.
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        runtime_env={
            "env_vars": {
                **{
                    k: os.environ[k]
                    for k in ("RAY_DATA_DISABLE_PROGRESS_BARS", "VLLM_LOGGING_LEVEL", "TOKENIZERS_PARALLELISM")
                },
                "PYTHONPATH": os.path.dirname(__file__),  # the coordinator imports tests/eval_hooks.py
            }
        },
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def pairs(toy):
    """16 toy pairs whose 'generated' side is another example's answer (a plausible wrong one)."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from spin_ray.data import load_sft

    tok = AutoTokenizer.from_pretrained(toy.model_dir)
    ex = load_sft(toy.train_path, tok, max_prompt_tokens=64, max_response_tokens=16)[:16]
    rows = [
        {"uid": e.uid, "prompt_ids": e.prompt_ids, "real_ids": e.real_ids, "generated_ids": ex[(i + 1) % 16].real_ids}
        for i, e in enumerate(ex)
    ]
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="session")
def toy_run(ray_session, toy, tmp_path_factory):
    """The fault-free reference run: two iterations, then the same output dir with
    spin.iterations=3, so the job resumes at iteration 3. Returns (dir, first, second summary).
    The live endpoint is on and asked one question throughout: the answers are in ../live.jsonl.
    The toy's held-out sums are an lm-eval task too (eval.lm_eval), scored by the same engines."""
    import threading

    from helpers import free_port, poll_live, repeated_records_file, toy_config, toy_tasks
    from ray import serve

    from spin_ray.driver.job import run_job
    from spin_ray.driver.prepare import prepare

    root = tmp_path_factory.mktemp("job")
    train = repeated_records_file(toy, root / "train.jsonl")
    port, stop = free_port(), threading.Event()
    poller = threading.Thread(target=poll_live, args=(f"http://127.0.0.1:{port}/v1", stop, root / "live.jsonl"))
    poller.start()
    summaries = []
    try:
        for iterations in (2, 3):
            hooks = 'eval.hooks=["eval_hooks:checkpoint", "eval_hooks:broken"]'
            live = ["serve.live=true", f"serve.port={port}", "serve.max_tokens=8"]
            lm_eval = ["eval.lm_eval.tasks=[spin_toy_addition]", "eval.lm_eval.chat_template=true"]
            lm_eval.append(f"eval.lm_eval.include_path={toy_tasks(toy, root / 'tasks')}")
            cfg = toy_config(root / "run", train, f"spin.iterations={iterations}", hooks, *live, *lm_eval)
            summaries.append(run_job(cfg, prepare(cfg)))
    finally:
        stop.set()
        poller.join()
        serve.shutdown()  # the next test that serves starts Serve on its own port
    return root / "run", *summaries


def pytest_collection_modifyitems(items):
    """The e2e tier: every test that needs a Ray cluster or a vLLM engine (the shared session, the
    reference run, or a Ray head of its own). `pytest -m "not e2e"` runs the rest in seconds."""
    for item in items:
        if {"ray_session", "toy_run"} & set(item.fixturenames) or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)
