"""An OpenAI-compatible endpoint for a run's checkpoints, on Ray Serve.

Each served checkpoint is a Ray Serve LLM deployment (vLLM's async engine, `spin-iter-<t>`), so
streaming, chat templates and sampling are vLLM's own; in front of them sits our gateway
(spin_ray.serve.gateway), reached through Serve's HTTP proxy or, with serve.direct_ingress, on
its own port (client -> gateway -> Serve LLM replica -> engine, as many processes as `vllm serve`
plus one).

With `serve.live=true` the same ingress answers during a SPIN job from the job's own engines
(model `spin-live`; each answer is named after the iteration whose weights gave it, e.g.
`spin-live-iter-2`), so after every hot-swap it answers from the new weights.

    python jobs/serve.py RUN_DIR --iteration all      # then: the `openai` client on /v1

A Serve config file (a RayService's `serveConfigV2`) starts the same app with
`import_path: spin_ray.serve.app:build` and jobs/serve.py's arguments as `args`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from spin_ray.card import summary
from spin_ray.cluster import free_port, in_use
from spin_ray.config import Config, ConfigError, load_config
from spin_ray.engines.client import Engines
from spin_ray.engines.engine import engine_env, engine_kwargs
from spin_ray.lora import engine_targets, is_adapter, split
from spin_ray.private import local_adapter_loader, model_card
from spin_ray.rundir import RunDir
from spin_ray.serve.gateway import Gateway, check_exposure, key_digest

LORA_BASE = "spin-base"  # the served base model of a LoRA run; requests name its adapters
APP = "spin"  # jobs/serve.py's Serve app (a Serve config file names its own)


def load(
    path: str | Path, iteration: str = "latest", merged: bool = False, overrides: Sequence[str] = ()
) -> tuple[Config, dict[str, Path], int]:
    """(config, {model name: dir}, engine length) to serve `path`: a run dir's own config.yaml gives
    the engine settings and prompt limit, `overrides` apply on top. Raises ConfigError, ValueError or
    OSError that say what to fix, before any engine starts."""
    from transformers import AutoConfig

    stored = Path(path) / "config.yaml"
    cfg = load_config(stored if stored.exists() else None, list(overrides))
    models = checkpoints(path, iteration, merged)
    contexts = [
        getattr(AutoConfig.from_pretrained(split(str(d))[0]), "max_position_embeddings", None) for d in models.values()
    ]
    longest = min((c for c in contexts if c), default=None)
    if prompt_limit(cfg) is None and longest:  # a model dir: no data to size prompts by, the model's context
        cfg.serve.max_prompt_tokens = max(1, longest - cfg.serve.max_tokens)
    if prompt_limit(cfg) is None:
        raise ConfigError(f"{path}: the model names no context (max_position_embeddings): set serve.max_prompt_tokens")
    length = max_model_len(cfg)
    if longest and length > longest:
        raise ConfigError(
            f"serve.max_prompt_tokens (or data.max_prompt_tokens) + serve.max_tokens = {length} exceeds "
            f"the model's max_position_embeddings ({longest}): lower them"
        )
    return cfg, models, length


def build(args: dict) -> Any:
    """The app of a Serve config file: `args` are `path` and optionally `iteration`, `merged` and
    `overrides` (a list of key=value), as jobs/serve.py takes them. The file's http_options give host
    and port; the key comes from the variable serve.api_key_env names, in the cluster's environment.
    Raises ValueError, before any deployment, where that key is missing and the host is not loopback
    (a RayService's 0.0.0.0): the gateway's Host rule alone would guard it, and clients set Host."""
    iteration, merged = str(args.get("iteration", "latest")), bool(args.get("merged", False))
    cfg, models, length = load(args["path"], iteration, merged, args.get("overrides", []))
    api_key = os.environ.get(cfg.serve.api_key_env)
    if (host := serve_host()) is not None:  # None: Serve runs no HTTP proxy, nothing listens
        check_exposure(host, api_key, cfg.serve.api_key_env)
    return application(models, cfg, length, api_key)


def serve_host() -> str | None:
    """The address Serve's HTTP proxies bind: the running Serve's (a config file's http_options,
    set before its apps are built), else the default Serve would start with."""
    from ray.serve.config import HTTPOptions

    client = running_serve()
    return (client.http_config if client else HTTPOptions()).host


def running_serve() -> Any:
    """The running Serve's controller client; None where no Serve runs on this Ray. Ray 2.60 has no
    public API for whether Serve runs or for its HTTP options (`serve.status()` leaves them out)."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


def stop_app(name: str, started: bool) -> str:
    """Deletes app `name`, and Serve itself where `started` (no Serve ran before ours) and no other
    app is left; returns what it did. On a shared cluster `serve.shutdown()` would remove every app;
    a Serve of ours left behind would keep its HTTP port, and ignore the next start's."""
    from ray import serve

    if running_serve() is None:
        return "Serve was not running"
    serve.delete(name)
    if started and not serve.status().applications:
        serve.shutdown()
        return "Serve shut down"
    return f"app {name} deleted; Serve runs on for the cluster's other apps"


def checkpoints(path: str | Path, iteration: str = "latest", merged: bool = False) -> dict[str, Path]:
    """{model name: HF dir or LoRA adapter dir}: `iteration` = N, N,M,..., `latest` or `all` of a run dir
    (a LoRA run's `merged` checkpoints instead of its adapters), or one plain HF or adapter dir."""
    path = Path(path)
    if (path / "config.json").exists() or is_adapter(path):
        return {path.name: path}
    run = RunDir(path)
    done = run.finished()
    if not done:
        raise ValueError(f"{path}: neither a HF model or adapter dir nor a run dir with a finished iteration")
    if iteration == "all":
        chosen = done
    elif iteration == "latest":
        chosen = done[-1:]
    elif all(t.isdigit() and int(t) in done for t in iteration.split(",")):
        chosen = sorted({int(t) for t in iteration.split(",")})
    else:
        raise ValueError(
            f"--iteration {iteration!r}: finished iterations in {path} are {done} (one, a list like 1,3, latest or all)"
        )
    if merged:
        missing = [t for t in chosen if not run.model(t).with_name("merged").is_dir()]
        if missing:
            raise ValueError(f"--merged: iterations {missing} of {path} have no merged/ (train.lora.export_merged)")
        return {f"spin-iter-{t}": run.model(t).with_name("merged") for t in chosen}
    return {f"spin-iter-{t}": run.model(t) for t in chosen}


def llm_config(name: str, model_dir: Path, cfg: Config, max_model_len: int, adapters: int = 0) -> Any:
    """One served model on the generation resources (`generation.*`), as the job's engines; with
    `adapters`, a base model that serves that many LoRA adapters."""
    from ray.serve.llm import LLMConfig

    g, s = cfg.generation, cfg.serve
    engine = {"dtype": cfg.model.dtype, **engine_kwargs(g, max_model_len)}
    extra: dict[str, Any] = {}
    if adapters:
        engine |= {"max_loras": adapters, "lora_target_modules": engine_targets(str(model_dir))}
        extra["lora_config"] = {"max_num_adapters_per_replica": adapters}
    env = engine_env(g)
    if g.num_gpus == 0:
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # Serve LLM runs vLLM's async engine in its own process
        # One process per replica: Serve LLM would run TP ranks as Ray actors (its executor), which
        # no test here runs on CPU; tensor parallelism on CPU is for the job's engines.
        engine |= {"tensor_parallel_size": 1}
        engine.pop("distributed_executor_backend", None)
        bundles = [{"CPU": g.num_cpus}]
    else:
        bundles = [{"GPU": g.num_gpus, "CPU": 1}] * g.tensor_parallel_size
    if g.resource:
        bundles[0] = bundles[0] | {g.resource: 1}
    return LLMConfig(
        model_loading_config={"model_id": name, "model_source": str(model_dir)},
        engine_kwargs=engine,
        placement_group_config={"bundles": bundles},
        runtime_env={"env_vars": env},
        deployment_config={
            "autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas},
            "max_ongoing_requests": s.max_concurrency,
        },
        **extra,
    )


def serve_models(models: dict[str, Path], cfg: Config, max_model_len: int, api_key: str | None) -> str:
    """Deploys every model behind one gateway on cfg.serve.host:port; returns the base URL. With
    serve.direct_ingress, Ray must have started after choose_ingress(cfg, ...)."""
    return _run(cfg, application(models, cfg, max_model_len, api_key), APP, bool(cfg.serve.direct_ingress))


def application(models: dict[str, Path], cfg: Config, max_model_len: int, api_key: str | None) -> Any:
    """Every model's Serve LLM deployment behind one gateway."""
    from ray.serve.llm import build_llm_deployment

    adapters = {name: str(d) for name, d in models.items() if is_adapter(d)}
    if adapters:  # a LoRA run: one base model in each replica, the iterations as its adapters
        bases = {split(d)[0] for d in adapters.values()}
        if len(bases) > 1 or len(adapters) < len(models):
            raise ValueError(f"LoRA adapters are served on one base model; these are not: {sorted(models)}")
        if not cfg.generation.max_lora_rank:
            raise ValueError("serving LoRA adapters needs generation.max_lora_rank (set with train.lora)")
        config = llm_config(LORA_BASE, Path(bases.pop()), cfg, max_model_len, adapters=len(adapters))
        loader = {"model_downloader": local_adapter_loader(adapters)}
        deployments = {LORA_BASE: build_llm_deployment(config, name_prefix="spin-", bind_kwargs=loader)}
        cards = {LORA_BASE: model_card(LORA_BASE, config)}
    else:
        configs = {name: llm_config(name, d, cfg, max_model_len) for name, d in models.items()}
        deployments = {name: build_llm_deployment(c, name_prefix=f"{name}-") for name, c in configs.items()}
        cards = {name: model_card(name, c) for name, c in configs.items()}
    return _gateway(cfg).bind(
        model_dirs={name: str(d) for name, d in models.items()},
        limits=_limits(cfg, max_model_len),
        key_digest=key_digest(api_key),
        llm_deployments=deployments,
        model_cards=cards,
        lora_base=LORA_BASE if adapters else None,
        summaries={name: summary(d) for name, d in models.items()},
    )


def live_endpoint(
    cfg: Config, engines: Engines, model_dir: str, digest: str | None, say: Callable[[str], None]
) -> Callable[[], None]:
    """serve.live: the job's engines behind the same routes while it runs; returns what stops it
    (nothing to stop when serve.live is off)."""
    if not cfg.serve.live:
        return lambda: None
    app = _gateway(cfg).bind(
        model_dirs={"spin-live": model_dir}, limits=_limits(cfg, max_model_len(cfg)), key_digest=digest, engines=engines
    )
    started = running_serve() is None
    say(f"live endpoint: {_run(cfg, app, 'spin-live')} (model spin-live, answers name their iteration)")

    def stop() -> None:
        stop_app("spin-live", started)

    return stop


def _gateway(cfg: Config) -> Any:
    from ray import serve

    return serve.deployment(
        serve.ingress()(Gateway),
        name="spin-gateway",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=cfg.serve.max_concurrency + 16,  # the excess meets our 429, not the proxy's queue
    )


def max_model_len(cfg: Config) -> int:
    """The served engines' length: the longest prompt allowed plus the most new tokens."""
    return cfg.generation.max_model_len or prompt_limit(cfg) + cfg.serve.max_tokens


def prompt_limit(cfg: Config) -> int | None:
    return cfg.serve.max_prompt_tokens or cfg.data.max_prompt_tokens


def _limits(cfg: Config, length: int) -> dict[str, int]:
    """The gateway's limits; a prompt may take what the engines' `length` leaves when no limit is set."""
    s = cfg.serve
    return {
        "max_tokens": s.max_tokens,
        "max_prompt_tokens": prompt_limit(cfg) or max(1, length - s.max_tokens),
        "max_body_bytes": s.max_body_kb * 1024,
        "max_concurrency": s.max_concurrency,
    }


def choose_ingress(cfg: Config, joins: bool) -> None:
    """Settles serve.direct_ingress before Ray starts (unset: direct on a Ray of our own, not when
    `joins` a cluster) and sets its variables; raises ValueError, before anything starts, where the
    endpoint could not come up.

    Direct ingress is Ray Serve's throughput-optimized mode, which every process of Serve reads when
    it starts, hence before Ray starts. The gateway is the only ingress, so its direct-ingress range
    is serve.port alone; Serve never retries a port it once failed to bind, hence the check here.
    Serve holds a released port back, and a stopping ingress open, for a load balancer in front to
    notice (HAProxy's; none here): that would keep a restarted gateway off serve.port for minutes,
    and make every stop take 35 s."""
    s = cfg.serve
    if s.direct_ingress and joins:
        raise ValueError(
            "serve.direct_ingress=true needs Serve's variables in every process of the cluster, so it is set "
            "only on a Ray this script starts; on a cluster, leave it unset (see docs/serving.md)"
        )
    if not joins and in_use(s.port, s.host):
        raise ValueError(f"port {s.port} on {s.host} is in use: pick another with --port")
    if s.direct_ingress is None:
        s.direct_ingress = not joins
    if s.direct_ingress:
        os.environ |= {
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(s.port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(s.port + 1),  # exclusive
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",  # requests in flight are still finished
        }


def _run(cfg: Config, app: Any, name: str, direct: bool = False) -> str:
    from ray import serve

    # Direct ingress still starts Serve's proxy on the head, with http_options' port: not serve.port.
    port = cfg.serve.port
    while direct and port == cfg.serve.port:
        port = free_port()
    serve.start(http_options={"host": cfg.serve.host, "port": port})
    serve.run(app, name=name, route_prefix="/", blocking=False)
    return f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
