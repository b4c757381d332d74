"""An OpenAI-compatible endpoint for a run's checkpoints, on Ray Serve.

Each served checkpoint is a Ray Serve LLM deployment (vLLM's async engine, `spin-iter-<t>`), so
streaming, chat templates and sampling are vLLM's own. In front of them sits one small ingress of
ours, for what Serve LLM's own ingress cannot be given: a bearer key, request limits checked
before any engine sees the request, OpenAI-style error JSON with 4xx codes, and a health route.

    python jobs/serve.py RUN_DIR --iteration all      # then: the `openai` client on /v1
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request  # at module level: FastAPI resolves the routes' annotations here

from spin_ray.config import Config
from spin_ray.generation import engine_env


def checkpoints(path: str | Path, iteration: str = "latest") -> dict[str, Path]:
    """{model name: HF dir}: `iteration` = N, `latest` or `all` of a run dir, or a plain HF dir."""
    path = Path(path)
    if (path / "config.json").exists():
        return {path.name: path}
    done = sorted(int(d.name.removeprefix("iter_")) for d in path.glob("iter_*") if (d / "DONE").exists())
    if not done:
        raise ValueError(f"{path}: neither a HF model dir (config.json) nor a run dir with a finished iteration")
    if iteration == "all":
        chosen = done
    elif iteration == "latest":
        chosen = done[-1:]
    elif iteration.isdigit() and int(iteration) in done:
        chosen = [int(iteration)]
    else:
        raise ValueError(f"--iteration {iteration!r}: finished iterations in {path} are {done} (or latest, all)")
    return {f"spin-iter-{t}": path / f"iter_{t}" / "model" for t in chosen}


def llm_config(name: str, model_dir: Path, cfg: Config, max_model_len: int) -> Any:
    """One served model on the generation resources (`generation.*`), as the job's engines."""
    from ray.serve.llm import LLMConfig

    g, s = cfg.generation, cfg.serve
    engine: dict[str, Any] = {
        "dtype": cfg.model.dtype,
        "max_model_len": max_model_len,
        "enforce_eager": g.enforce_eager,
    }
    env = engine_env(g)
    if g.num_gpus == 0:
        # As the job's CPU engines: whole-prompt prefill (seeded sampling crashes on split prompts).
        engine |= {"kv_cache_memory_bytes": int(g.kv_cache_gib * 2**30), "enable_chunked_prefill": False}
        engine["max_num_batched_tokens"] = max(max_model_len, 4096)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # Serve LLM runs vLLM's async engine in its own process
        bundles = [{"CPU": g.num_cpus}]
    else:
        engine |= {"gpu_memory_utilization": g.gpu_memory_utilization, "tensor_parallel_size": g.tensor_parallel_size}
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
    )


def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> Any:
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": kind, "param": param, "code": code or kind}}
    return JSONResponse(body, status_code=status)


class Gateway:
    """The ingress: key, limits and validation, then Serve LLM's OpenAI handling of the request."""

    def __init__(
        self, llm_deployments: dict, model_cards: dict, model_dirs: dict[str, str], limits: dict, key_digest: str | None
    ):
        from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
        from transformers import AutoTokenizer

        self.oai = OpenAiIngress(llm_deployments, model_cards)
        self.tokenizers = {name: AutoTokenizer.from_pretrained(d) for name, d in model_dirs.items()}
        self.limits = limits
        self.key_digest = key_digest  # sha256 of the key: the key itself never enters Ray
        self.in_flight = 0

    async def __serve_build_asgi_app__(self) -> Any:
        app = FastAPI(title="spin-ray")

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok", "models": sorted(self.tokenizers)}

        @app.get("/v1/models")
        async def models(request: Request) -> Any:
            return self._denied(request) or (await self.oai.models()).model_dump()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            return await self._handle(request, "chat")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await self._handle(request, "completions")

        return app

    def _denied(self, request: Any) -> Any:
        if self.key_digest is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(_digest(token), self.key_digest):
            return None
        return error(401, "a valid bearer key is required (Authorization: Bearer ...)", "invalid_api_key")

    async def _handle(self, request: Any, kind: str) -> Any:
        """Every check that can fail fails here with its 4xx, before any engine sees the request."""
        from pydantic import ValidationError
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        if denied := self._denied(request):
            return denied
        raw = await request.body()
        if len(raw) > self.limits["max_body_bytes"]:
            return error(413, f"request body over {self.limits['max_body_bytes']} bytes", "request_too_large")
        try:
            body = json.loads(raw)
        except ValueError as e:
            return error(400, f"the body is not valid JSON: {e}", "invalid_request_error", code="invalid_json")
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object", "invalid_request_error")
        if problem := self._check(body, kind):
            return problem
        if self.in_flight >= self.limits["max_concurrency"]:
            return error(429, f"more than {self.limits['max_concurrency']} requests in flight", "rate_limit_exceeded")
        try:
            parsed = (ChatCompletionRequest if kind == "chat" else CompletionRequest).model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            return error(400, f"{param}: {first['msg']}", "invalid_request_error", param=param)
        self.in_flight += 1
        try:
            # No raw request downstream: the Authorization header stays in this process.
            response = await self.oai._process_llm_request(parsed, kind, None)
        except Exception as e:  # noqa: BLE001 - vLLM's 4xx (and any failure) as OpenAI error JSON
            self.in_flight -= 1
            status = getattr(e, "status_code", 500)
            return error(
                status,
                str(getattr(e, "message", None) or e),
                "invalid_request_error" if status < 500 else "server_error",
            )
        if hasattr(response, "body_iterator"):  # a stream is in flight until its last event
            response.body_iterator = self._counted(response.body_iterator)
        else:
            self.in_flight -= 1
        return response

    async def _counted(self, events: Any) -> Any:
        try:
            async for event in events:
                yield event
        finally:
            self.in_flight -= 1

    def _check(self, body: dict, kind: str) -> Any:
        """Model, numbers in range, prompt length: OpenAI's error shapes, our limits."""
        names = sorted(self.tokenizers)
        model = body.get("model", names[0] if len(names) == 1 else None)
        if model not in self.tokenizers:
            return error(
                404,
                f"model {model!r} is not served here; models: {names}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        body["model"] = model
        limit = self.limits["max_tokens"]
        max_tokens = body.pop("max_completion_tokens", None) or body.get("max_tokens") or limit
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
            return error(400, f"max_tokens must be an integer in [1, {limit}]", "invalid_request_error", "max_tokens")
        body["max_tokens"] = max_tokens
        for param, low, high in (("temperature", 0.0, 2.0), ("top_p", 1e-9, 1.0)):
            value = body.get(param)
            if value is not None and (not isinstance(value, int | float) or not low <= value <= high):
                return error(400, f"{param} must be a number in [{low:g}, {high:g}]", "invalid_request_error", param)
        if body.get("n", 1) != 1:
            return error(400, "only n=1 is supported", "invalid_request_error", "n")
        try:
            tokenizer = self.tokenizers[model]
            if kind == "chat":
                messages = body["messages"]
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            else:
                ids = tokenizer(body["prompt"])["input_ids"]
        except Exception as e:  # noqa: BLE001 - any malformed prompt
            field = "messages" if kind == "chat" else "prompt"
            return error(400, f"{field} could not be read: {e!r}", "invalid_request_error", field)
        if len(ids) > self.limits["max_prompt_tokens"]:
            message = f"the prompt has {len(ids)} tokens; this server takes at most {self.limits['max_prompt_tokens']}"
            return error(400, message, "invalid_request_error", "messages", "context_length_exceeded")
        return None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def serve_models(models: dict[str, Path], cfg: Config, max_model_len: int, api_key: str | None) -> str:
    """Deploys every model behind one gateway on cfg.serve.host:port; returns the base URL."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import build_llm_deployment

    s = cfg.serve
    configs = {name: llm_config(name, d, cfg, max_model_len) for name, d in models.items()}
    limits = {
        "max_tokens": s.max_tokens,
        "max_prompt_tokens": s.max_prompt_tokens or cfg.data.max_prompt_tokens,
        "max_body_bytes": s.max_body_kb * 1024,
        "max_concurrency": s.max_concurrency,
    }
    gateway = serve.deployment(
        serve.ingress()(Gateway),
        name="spin-gateway",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=s.max_concurrency + 16,  # the excess meets our 429, not a queue in the proxy
    )
    app = gateway.bind(
        llm_deployments={name: build_llm_deployment(c, name_prefix=f"{name}-") for name, c in configs.items()},
        model_cards={name: to_model_metadata(name, c) for name, c in configs.items()},
        model_dirs={name: str(d) for name, d in models.items()},
        limits=limits,
        key_digest=_digest(api_key) if api_key else None,
    )
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(app, name="spin", route_prefix="/", blocking=False)
    return f"http://{s.host}:{s.port}/v1"
