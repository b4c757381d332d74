"""The OpenAI endpoint on Ray Serve, driven by the official `openai` client on loopback."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch
from helpers import LIVE_QUESTION, free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

from spin_ray.serve.app import checkpoints
from spin_ray.toy import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-not-a-secret"
SERVED = ("spin-iter-1", "spin-iter-3")


def hf_greedy_text(model_dir: Path, question: str, max_tokens: int = 8) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": question}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(ids) :]
    return tok.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def server(toy_run, toy, tmp_path_factory):
    """`jobs/serve.py RUN --iteration 1,3` as a user starts it on one machine: its own Ray, where
    the gateway itself listens on serve.port (serve.direct_ingress's default there; the path
    through Serve's proxy, a cluster's default, is tested in test_job.py on a Ray head)."""
    out = toy_run[0]
    models = {name: path for name, path in checkpoints(out, "all").items() if name in SERVED}
    port = free_port()
    command = [sys.executable, str(ROOT / "jobs" / "serve.py"), str(out), "--iteration", "1,3", "--port", str(port)]
    command += ["serve.max_tokens=8", "serve.max_body_kb=16", "generation.max_model_len=48"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"SPIN_SERVE_API_KEY": KEY}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as sink:  # a pipe nobody reads would fill and block it
        proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
    library = out / "logs" / "serve.log"

    def said() -> str:
        libraries = library.read_text()[-3000:] if library.exists() else ""
        return f"{log.read_text()[-2000:]}\n--- logs/serve.log:\n{libraries}"

    try:
        deadline = time.monotonic() + 600
        while True:  # each model's engine loads in its own replica
            try:
                if {m.id for m in client.models.list()} == set(SERVED):
                    client.chat.completions.create(model=SERVED[0], messages=[{"role": "user", "content": "1+1="}])
                    break
            except openai.APIError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, said()
            time.sleep(2)
        listening = [c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
        assert listening and "spin-gateway" in " ".join(psutil.Process(listening[0]).cmdline()), "not the gateway's"
        questions = [r["messages"][0]["content"] for r in read_jsonl(toy.eval_path)[:200]]
        yield url, client, models, questions
        proc.send_signal(signal.SIGTERM)  # it shuts Serve and its Ray down
        assert proc.wait(timeout=120) == 0, said()
        # The console: the script's own lines; Serve's deployment dumps and its proxy's port in the run's log.
        console = log.read_text().splitlines()
        assert console[0] == f"starting spin-iter-1, spin-iter-3 on a local Ray; the libraries' output: {library}"
        assert any(line.startswith(f"serving spin-iter-1, spin-iter-3 at {url} (up in ") for line in console)
        assert console[-1] == "stopping: Serve shut down" and len(console) < 30, console
        assert "Deployment Options" in library.read_text()
    finally:
        if proc.poll() is None:  # failed before its clean stop: its whole session, by our own PID
            os.killpg(proc.pid, signal.SIGKILL)


def test_greedy_chat_equals_hf_greedy_and_iterations_differ(server):
    url, client, models, questions = server
    greedy = {name: {q: hf_greedy_text(d, q) for q in questions[:40]} for name, d in models.items()}
    differing = [q for q in questions[:40] if greedy[SERVED[0]][q] != greedy[SERVED[1]][q]]
    assert differing, "p_1 and p_3 answer these 40 prompts alike; pick another run"
    for q in [questions[0], *differing[:3]]:
        for name in SERVED:
            reply = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=8, seed=1
            )
            assert reply.choices[0].message.content == greedy[name][q], (name, q)
    q = differing[0]
    answers = {
        name: client.chat.completions.create(model=name, messages=[{"role": "user", "content": q}], temperature=0)
        .choices[0]
        .message.content
        for name in SERVED
    }
    assert answers[SERVED[0]] != answers[SERVED[1]]


def test_streaming_and_completions(server):
    url, client, models, questions = server
    messages = [{"role": "user", "content": questions[1]}]
    whole = client.chat.completions.create(model=SERVED[1], messages=messages, temperature=0)
    stream = client.chat.completions.create(model=SERVED[1], messages=messages, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content
    done = client.completions.create(model=SERVED[1], prompt="12+34=", max_tokens=4, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens <= 4


def test_32_concurrent_requests_all_answered(server):
    url, _, _, questions = server

    async def ask_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=300)
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=SERVED[i % 2], messages=[{"role": "user", "content": q}], temperature=1, seed=i
                )
                for i, q in enumerate(questions[:32])
            )
        )
        return [r.choices[0].message.content for r in replies]

    answers = asyncio.run(ask_all())
    assert len(answers) == 32 and all(isinstance(a, str) for a in answers)


JSON = {"content-type": "application/json"}


def test_bad_requests_get_their_4xx_and_the_server_keeps_serving(server):
    url, client, _, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    good = {"model": SERVED[0], "messages": [{"role": "user", "content": "12+34="}]}
    cases = [
        ({"content": b"{not json", "headers": JSON}, 400, "invalid_json"),
        ({"content": b"{}", "headers": {"content-type": "text/plain"}}, 415, "invalid_request_error"),
        ({"json": good | {"model": "gpt-4"}}, 404, "model_not_found"),
        ({"json": good | {"temperature": 5}}, 400, "invalid_request_error"),
        ({"json": good | {"max_tokens": 100_000}}, 400, "invalid_request_error"),
        ({"json": good | {"messages": [{"role": "user", "content": "12+34=" * 20}]}}, 400, "context_length_exceeded"),
        ({"json": good | {"messages": "hello"}}, 400, "invalid_request_error"),
        (
            {"content": b"{" + b" " * 20_000 + b"}", "headers": {"content-type": "application/json"}},
            413,
            "request_too_large",
        ),
    ]
    with httpx.Client(base_url=url, timeout=60) as http:
        for kwargs, status, code in cases:
            reply = http.post("/chat/completions", headers=auth | kwargs.pop("headers", {}), **kwargs)
            assert reply.status_code == status, (kwargs, reply.text)
            assert reply.json()["error"]["code"] == code, reply.text
        assert http.post("/chat/completions", json=good).status_code == 401  # no key
        assert http.get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get(url.removesuffix("/v1") + "/health").json()["models"] == list(SERVED)
        assert http.post("/chat/completions", headers=auth, json=good).status_code == 200  # still serving


def test_live_endpoint_answers_from_the_weights_of_each_swap(toy_run, toy):
    """During the toy job (conftest's toy_run), the live endpoint's greedy answer under the name
    `spin-live-iter-<t>` equals HF greedy decoding of iter_<t>/model (p_0 for t = 0)."""
    out = toy_run[0]
    seen = [json.loads(line) for line in (out.parent / "live.jsonl").read_text().splitlines()]
    answers: dict[int, set[str]] = {}
    for s in seen:
        answers.setdefault(int(s["model"].removeprefix("spin-live-iter-")), set()).add(s["text"])
    assert len(answers) >= 3, answers  # several swaps observed while the job ran
    for t, texts in answers.items():
        assert texts == {hf_greedy_text(out / f"iter_{t}" / "model" if t else toy.model_dir, LIVE_QUESTION)}, t


def test_a_serve_config_app_is_refused_keyless_on_a_non_loopback_host(toy, monkeypatch):
    """build(), a Serve config file's app (a RayService binds 0.0.0.0), reads the host from the
    running Serve and refuses before any deployment is made when the key variable is missing."""
    from types import SimpleNamespace

    from ray.serve.config import HTTPOptions

    from spin_ray.serve import app

    args = {"path": str(toy.model_dir), "overrides": ["serve.max_prompt_tokens=64"]}
    built = []
    monkeypatch.setattr(app, "application", lambda *args: built.append(args[-1]))  # the key it got
    for host, key, refused in (("0.0.0.0", None, True), ("127.0.0.1", None, False), ("0.0.0.0", KEY, False)):
        running = SimpleNamespace(http_config=HTTPOptions(host=host))
        monkeypatch.setattr("ray.serve.context._get_global_client", lambda **_: running)  # noqa: B023 - used at once
        if key:
            monkeypatch.setenv("SPIN_SERVE_API_KEY", key)
        else:
            monkeypatch.delenv("SPIN_SERVE_API_KEY", raising=False)
        if refused:
            with pytest.raises(ValueError, match="host 0.0.0.0 exposes the endpoint beyond this machine"):
                app.build(args)
        else:
            app.build(args)
    assert built == [None, KEY]


def test_stopping_deletes_our_app_alone_and_serve_only_where_we_started_it(ray_session):
    """A cluster's Serve, with another app, stays when ours stops (serve.shutdown() removed every
    app); a Serve we started goes with our app. serve_host(), called in a task as a Serve config's
    build is, reads the running Serve's host."""
    import ray
    from ray import serve

    from spin_ray.serve.app import running_serve, serve_host, stop_app

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    def hello() -> str:
        return "hello"

    serve.shutdown()  # this test's own Ray: a clean slate
    serve.start(http_options={"host": "127.0.0.2", "port": free_port()})  # someone else's Serve
    serve.run(hello.bind(), name="other", route_prefix="/other")
    started = running_serve() is None
    serve.run(hello.bind(), name="spin", route_prefix="/spin")
    assert ray.get(ray.remote(serve_host).remote()) == "127.0.0.2"
    assert stop_app("spin", started) == "app spin deleted; Serve runs on for the cluster's other apps"
    assert set(serve.status().applications) == {"other"}
    serve.shutdown()
    started = running_serve() is None
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    serve.run(hello.bind(), name="spin", route_prefix="/spin")
    assert stop_app("spin", started) == "Serve shut down" and running_serve() is None


@pytest.mark.e2e  # jobs/serve.py starts a Ray of its own and an engine
def test_an_engine_core_that_fails_to_start_is_pointed_to(toy, tmp_path):
    """vLLM's engine core runs in a process of its own: the deployment's message says only "See root
    cause above"; the console names the replica's log where the engine core wrote that cause."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, str(ROOT / "jobs" / "serve.py"), str(toy.model_dir), "--port", str(free_port())]
    command += ["serve.max_prompt_tokens=32", "serve.max_tokens=8", "generation.kv_cache_gib=0.000001"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1 and "Engine core initialization failed" in proc.stdout, proc.stdout
    (line,) = [line for line in proc.stdout.splitlines() if "engine core says why in" in line]
    log = Path(line.split(" says why in ")[1])
    assert "No available memory for the cache blocks" in log.read_text(), line
    assert proc.stdout.splitlines()[-1] == "stopping: Serve shut down"  # its own Ray's Serve: all of it


def test_cli_refuses_what_it_cannot_serve_before_starting_anything(tmp_path, toy_run):
    out = toy_run[0]
    cluster = os.environ | {"RAY_ADDRESS": "127.0.0.1:1"}  # nothing there: refused before any connection
    local = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with socket.create_server(("127.0.0.1", free_port())) as taken:
        for args, env, message in (
            ([str(tmp_path)], local, "neither a HF model or adapter dir"),
            ([str(out), "--iteration", "1,9"], local, "[1, 2, 3]"),
            ([str(out), "serve.direct_ingress=true"], cluster, "only on a Ray this script starts"),
            ([str(out), "--port", str(taken.getsockname()[1])], local, "is in use: pick another with --port"),
        ):
            command = [sys.executable, str(ROOT / "jobs" / "serve.py"), *args]
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
            assert proc.returncode == 2 and message in proc.stderr, proc.stderr
