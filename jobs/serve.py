"""Serve a run's checkpoints (or any HF model dir) as an OpenAI-compatible endpoint on Ray Serve.

    python jobs/serve.py runs/toy                         # the latest iteration, as spin-iter-<t>
    python jobs/serve.py runs/toy --iteration all         # every finished iteration at once (or 1,3)
    python jobs/serve.py /models/my-sft --port 8001 generation.num_gpus=1 model.dtype=bfloat16
    python jobs/serve.py runs/lora --iteration all        # a LoRA run: its adapters on one base model
    python jobs/serve.py runs/lora --merged               # ... or its merged checkpoints (export_merged)

A run dir's own config.yaml gives the engine settings (`generation.*`, `model.dtype`) and the
prompt limit; `serve.*` keys and overrides apply on top. Binds 127.0.0.1 unless --host says
otherwise; when the variable named by `serve.api_key_env` (SPIN_SERVE_API_KEY) is set, every /v1
request needs `Authorization: Bearer <key>`. On a Ray it starts itself, the gateway listens on the
port directly (serve.direct_ingress); joining a cluster (RAY_ADDRESS), requests pass Serve's proxy.
Runs until interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a run dir (run.output_dir) or a Hugging Face model dir")
    parser.add_argument("--iteration", default="latest", help="N, a list such as 1,3, latest or all (run dirs only)")
    parser.add_argument("--merged", action="store_true", help="a LoRA run's merged checkpoints, not its adapters")
    parser.add_argument("--host", help="bind address (default serve.host: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default serve.port: 8000)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. serve.max_tokens=64")
    args = parser.parse_intermixed_args(argv)

    from spin_ray.config import ConfigError
    from spin_ray.serve.app import load

    flags = [f"serve.host={args.host}"] * bool(args.host) + [f"serve.port={args.port}"] * bool(args.port)
    try:
        cfg, models, length = load(args.path, args.iteration, args.merged, [*args.overrides, *flags])
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from spin_ray.cluster import join_or_start, ray_address
    from spin_ray.logs import console_to_log, error_line
    from spin_ray.serve.app import APP, choose_ingress, running_serve, serve_models, stop_app
    from spin_ray.serve.gateway import check_exposure

    try:
        check_exposure(cfg.serve.host, os.environ.get(cfg.serve.api_key_env), cfg.serve.api_key_env)
        choose_ingress(cfg, joins=bool(ray_address(cfg)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    say, log = console_to_log(Path(args.path), "serve")
    where = f"the cluster at {address}" if (address := ray_address(cfg)) else "a local Ray"
    say(f"starting {', '.join(models)} on {where}; the libraries' output: {log}")
    code, loading, started = 0, threading.Event(), False
    try:
        # Logical CPUs as the job gives them: each model's replica and its engine wait mostly.
        join_or_start(cfg, max(os.cpu_count() or 1, 2 * len(models) + 2))
        # After ray.init, which sets its own: a SIGTERM, during start-up too, stops this script as
        # Ctrl-C does, through the `finally` that stops our app (on a cluster Ray outlives us).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        started = running_serve() is None  # a cluster's Serve, and its other apps, stay when we go
        tick = time.monotonic()
        threading.Thread(target=say_progress, args=(loading, tick, say), daemon=True).start()
        api_key = os.environ.get(cfg.serve.api_key_env)
        url = serve_models(models, cfg, length, api_key)
        loading.set()
        env = f"${cfg.serve.api_key_env}"
        key = f"required, from {env}" if api_key else f"none (set {env})"
        say(f"serving {', '.join(models)} at {url} (up in {time.monotonic() - tick:.0f} s); key: {key}")
        auth = f'-H "Authorization: Bearer {env}" ' if api_key else ""
        body = f'{{"model": "{next(iter(models))}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
        say(f"  try: curl {url}/chat/completions -H 'Content-Type: application/json' {auth}-d '{body}'")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except Exception as e:  # noqa: BLE001 - said on the console, its traceback in the log
        say(error_line(e))
        for name, d in deployments().items():
            if d.status != "HEALTHY" and d.message.strip():  # a replica's start-up error, else in Ray's logs only
                print(f"{name}: {d.message}", flush=True)  # whole, into the log
                say(f"  {name}: {d.message.strip().splitlines()[-1]}")
                if "Engine core initialization failed" in d.message:  # vLLM's; its cause is "above", elsewhere
                    say(f"  {name}'s engine core says why in {engine_core_log(name)}")
        say(f"  (whole: {log})")
        code = 1
    finally:
        loading.set()
        import ray

        if ray.is_initialized():
            say(f"stopping: {stop_app(APP, started)}")
    return code


def deployments() -> dict:
    """The spin app's deployments (gateway, one per model) by name with Serve's status of each;
    none before Ray is up (Serve would start a Ray of its own) or the app is deployed."""
    import ray
    from ray import serve

    from spin_ray.serve.app import APP

    if not ray.is_initialized():
        return {}
    try:
        return serve.status().applications[APP].deployments
    except Exception:  # noqa: BLE001 - not deployed yet, or Serve is going: nothing to say
        return {}


def engine_core_log(deployment: str) -> str:
    """Where a replica's engine core wrote its start-up error: vLLM's EngineCore process inherits the
    replica's stdout, so its lines ("(EngineCore pid=...) ERROR ...") are in the replica worker's
    log in Ray's session dir on the replica's node, not in the deployment's message or Serve's logs."""
    from spin_ray.serve.app import APP

    ray_dir = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"  # Ray's default on Linux
    header = f":actor_name:ServeReplica:{APP}:{deployment}"

    def starts_with_header(path: Path) -> bool:  # a worker log's first lines name its actor
        with path.open(errors="replace") as f:
            return header in f.read(500)

    # Every session's: session_latest is whichever Ray on this machine started last.
    found = [p for p in ray_dir.glob("session_2*/logs/worker-*.out") if starts_with_header(p)]
    if found:
        return str(max(found, key=lambda p: p.stat().st_mtime))  # the last of Serve's tries
    return f"{ray_dir}/session_latest/logs/worker-*.out on the replica's node (the one that starts {header!r})"


def say_progress(loaded: threading.Event, tick: float, say) -> None:
    """Every 30 s until `loaded`: how many of the app's deployments are up."""
    while not loaded.wait(30):
        status = deployments()
        up = sum(d.status == "HEALTHY" for d in status.values())
        if status and not loaded.is_set():
            say(f"  {up}/{len(status)} deployments up after {time.monotonic() - tick:.0f} s (engines loading)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
