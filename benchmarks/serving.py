"""Serving benchmark: spin-ray's endpoint as `jobs/serve.py` starts it on one machine (our gateway
on its own port + Ray Serve LLM) against vLLM's own OpenAI server (`vllm serve`), on the same
model, engine settings and load, both on loopback.

    python benchmarks/serving.py [--rounds 5] [--requests 96] [--concurrency 1 8 32] [--new-tokens 32]
    python benchmarks/serving.py --proxy      # spin-ray behind Serve's HTTP proxy, as on a cluster

Both servers stay up and take turns: each round measures every concurrency level on both, the
order alternating from round to round, so that a noisy minute on a shared machine falls on both.
Prints, per level, the median requests/s and p50/p99 latency of each over the rounds, and the
median throughput ratio ours / vllm serve with its spread (min-max over rounds). Goal: >= 0.9x
at every level with no worse p99. The model is a random Llama built here with the toy tokenizer
(nothing from the hub); requests are chat completions sampled with a seed each, so both servers
generate the same tokens.
"""

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from models import make_llama

from spin_ray.cluster import free_port

ROOT = Path(__file__).resolve().parent.parent
MAX_MODEL_LEN = 128
KV_BYTES = 2**28
# One OpenMP thread per engine, as the job's engines and Serve's replicas run (spin_ray.engines.engine).
ENGINE_ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false"}


async def load(url: str, model: str, requests: int, concurrency: int, new_tokens: int) -> dict[str, float]:
    """`requests` chat completions, `concurrency` at a time: requests/s, p50/p99 seconds, tokens."""
    gate = asyncio.Semaphore(concurrency)
    latencies, tokens = [], 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"{10 + i % 90}+{99 - i % 90}="}],
            "max_tokens": new_tokens,
            "temperature": 1.0,
            "seed": i,
        }
        async with gate:
            tick = time.perf_counter()
            reply = await client.post(f"{url}/chat/completions", json=body)
            latencies.append(time.perf_counter() - tick)
        reply.raise_for_status()
        tokens += reply.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        tick = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(requests)))
        wall = time.perf_counter() - tick
    latencies.sort()
    return {
        "rps": requests / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "tokens": tokens,
    }


def wait_up(url: str, model: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = httpx.post(
                f"{url}/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "1+1="}], "max_tokens": 2},
                timeout=30,
            )
            if reply.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def warmed(url: str, model: str, args: argparse.Namespace) -> str:
    wait_up(url, model)
    asyncio.run(load(url, model, args.concurrency[-1], args.concurrency[-1], args.new_tokens))
    return url


@contextlib.contextmanager
def vllm_serve(model_dir: Path, name: str, args: argparse.Namespace) -> Iterator[str]:
    port = free_port()
    # `vllm serve` itself, without its CLI wrapper: that asks for the package metadata of "vllm",
    # and the CPU build is installed as "vllm-cpu" (PackageNotFoundError).
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    command += ["--served-model-name", name]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager"]
    command += ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(KV_BYTES)]
    command += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096", "--disable-uvicorn-access-log"]
    server = subprocess.Popen(
        command,
        env=os.environ | ENGINE_ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield warmed(f"http://127.0.0.1:{port}/v1", name, args)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its engine process, by our own PID
        server.wait(timeout=120)


@contextlib.contextmanager
def spin_serve(model_dir: Path, name: str, args: argparse.Namespace) -> Iterator[str]:
    import ray
    from ray import serve

    from spin_ray.config import load_config
    from spin_ray.serve.app import choose_ingress, serve_models

    cfg = load_config(
        None,
        [
            f"serve.port={free_port()}",
            f"serve.max_tokens={args.new_tokens}",
            f"serve.max_prompt_tokens={MAX_MODEL_LEN - args.new_tokens}",
            f"serve.direct_ingress={not args.proxy}",
            f"generation.kv_cache_gib={KV_BYTES / 2**30}",
            "generation.num_cpus=1",
        ],
    )
    choose_ingress(cfg, joins=False)  # as jobs/serve.py does, before Ray starts Serve's processes
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield warmed(serve_models({name: model_dir}, cfg, MAX_MODEL_LEN, api_key=None), name, args)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="spin-ray behind Serve's HTTP proxy, as when jobs/serve.py joins a cluster (serve.direct_ingress=false)",
    )
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Ray's driver logging would print every request
    runs: dict[str, dict[int, list[dict[str, float]]]] = {"vllm serve": {}, "spin-ray": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        params = make_llama(
            model_dir, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8
        )
        print(f"model: random Llama, {params / 1e6:.1f}M params, fp32; {args.requests} requests per level", flush=True)
        with vllm_serve(model_dir, "bench", args) as theirs, spin_serve(model_dir, "bench", args) as ours:
            servers = [("vllm serve", theirs), ("spin-ray", ours)]
            for r in range(args.rounds):
                for c in args.concurrency:
                    for name, url in servers[:: 1 if r % 2 == 0 else -1]:
                        result = asyncio.run(load(url, "bench", args.requests, c, args.new_tokens))
                        runs[name].setdefault(c, []).append(result)
                print(f"round {r + 1}/{args.rounds} done", flush=True)
    median = statistics.median
    print(f"\nmedians over {args.rounds} rounds, the servers alternating")
    print(f"{'concurrency':>11} {'server':>11} {'req/s':>8} {'p50 s':>8} {'p99 s':>8} {'tokens':>8}")
    for c in args.concurrency:
        for name, by_level in runs.items():
            rs = by_level[c]
            row = [median(x[k] for x in rs) for k in ("rps", "p50", "p99")]
            print(f"{c:>11} {name:>11} {row[0]:>8.2f} {row[1]:>8.3f} {row[2]:>8.3f} {rs[0]['tokens']:>8}")
        ratios = sorted(o["rps"] / t["rps"] for o, t in zip(runs["spin-ray"][c], runs["vllm serve"][c], strict=True))
        p99 = median(o["p99"] / t["p99"] for o, t in zip(runs["spin-ray"][c], runs["vllm serve"][c], strict=True))
        print(
            f"{c:>11} {'ratio':>11} {median(ratios):>7.2f}x (min {ratios[0]:.2f}, max {ratios[-1]:.2f}); p99 {p99:.2f}x"
        )


if __name__ == "__main__":
    main()
