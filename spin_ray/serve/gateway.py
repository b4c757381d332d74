"""The ingress of every OpenAI endpoint spin-ray serves: key, limits and validation first.

In front of Ray Serve LLM's deployments (checkpoints) or the running job's engines (serve.live)
sits this one small replica, for what Serve LLM's own ingress cannot be given: a bearer key,
request limits checked before any engine sees the request, OpenAI-style error JSON with 4xx
codes, and a health route.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request  # at module level: FastAPI resolves the routes' annotations here
from fastapi.responses import JSONResponse, StreamingResponse

from spin_ray.engines.client import Engines, EngineUnavailable
from spin_ray.private import openai_ingress, openai_request
from spin_ray.rundir import iteration_of

LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> Any:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or kind}}
    return JSONResponse(body, status_code=status)


class Gateway:
    """The ingress: key, limits and validation, then Serve LLM's OpenAI handling of the request
    (checkpoints) or the job's engines (`engines`, live mode)."""

    def __init__(
        self,
        model_dirs: dict[str, str],
        limits: dict,
        key_digest: str | None,
        llm_deployments: dict | None = None,
        model_cards: dict | None = None,
        engines: Engines | None = None,
        lora_base: str | None = None,
        summaries: dict[str, str | None] | None = None,
    ):
        from transformers import AutoTokenizer

        if engines is None:
            self.oai = openai_ingress(llm_deployments, model_cards)
        self.engines = engines
        self.lora_base = lora_base  # the models are LoRA adapters of this Serve LLM model
        self.summaries = summaries or {}  # each model card's one line (spin_ray.card)
        # Live requests go to the engines one at a time: a SPIN batch never waits behind more than one.
        self.live_turn = asyncio.Semaphore(1)
        self.tokenizers = {name: AutoTokenizer.from_pretrained(d) for name, d in model_dirs.items()}
        self.limits = limits
        self.key_digest = key_digest
        self.in_flight = 0

    async def __serve_build_asgi_app__(self) -> Any:
        app = FastAPI(title="spin-ray")

        @app.exception_handler(Exception)
        async def failed(request: Request, e: Exception) -> Any:  # never a plain-text 500
            return error(500, f"internal error: {type(e).__name__}", "server_error")

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok", "models": sorted(self.tokenizers)}

        @app.get("/v1/models")
        async def models(request: Request) -> Any:
            if denied := self._denied(request):
                return denied
            if self.engines is not None or self.lora_base:  # Serve LLM lists adapters from cloud storage only
                listed = {"data": [{"id": m, "object": "model", "owned_by": "spin-ray"} for m in self.tokenizers]}
            else:
                listed = (await self.oai.models()).model_dump()
            for entry in listed["data"]:
                if text := self.summaries.get(entry["id"]):
                    entry["summary"] = text
            return {"object": "list"} | listed

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            return await self._handle(request, "chat")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await self._handle(request, "completions")

        return app

    def _denied(self, request: Any) -> Any:
        if self.key_digest is None:
            # Keyless means loopback only: a page on another site that rebinds its DNS name to
            # 127.0.0.1 still sends its own name as Host.
            host = request.headers.get("host", "")
            host = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.split(":")[0]
            if host not in LOOPBACK:
                return error(403, f"Host {host!r} is not served without a key", "invalid_request_error")
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(key_digest(token) or "", self.key_digest):
            return None
        return error(401, "a valid bearer key is required (Authorization: Bearer ...)", "invalid_api_key")

    async def _handle(self, request: Any, kind: str) -> Any:
        """Every check that can fail fails here with its 4xx, before any engine sees the request."""
        from pydantic import ValidationError
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        if denied := self._denied(request):
            return denied
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return error(415, "the body must be JSON (Content-Type: application/json)", "invalid_request_error")
        raw = await self._body(request)
        if raw is None:
            return error(413, f"request body over {self.limits['max_body_bytes']} bytes", "request_too_large")
        try:
            body = json.loads(raw)
        except ValueError as e:
            return error(400, f"the body is not valid JSON: {e}", "invalid_request_error", code="invalid_json")
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object", "invalid_request_error")
        problem, prompt_ids = self._check(body, kind)
        if problem:
            return problem
        if self.in_flight >= self.limits["max_concurrency"]:
            return error(429, f"more than {self.limits['max_concurrency']} requests in flight", "rate_limit_exceeded")
        try:
            parsed = (ChatCompletionRequest if kind == "chat" else CompletionRequest).model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            return error(400, f"{param}: {first['msg']}", "invalid_request_error", param=param)
        # Counted until answered, failed, or cancelled (Serve cancels the handler when the client
        # goes); a stream until its last event, or until it is dropped unread.
        self.in_flight += 1
        release = _once(self._release)
        streaming = False
        try:
            if self.engines is not None:
                return await self._live(parsed, kind, prompt_ids)
            if self.lora_base:  # Serve LLM's name for an adapter of a served model
                parsed.model = f"{self.lora_base}:{parsed.model}"
            # No raw request downstream: the Authorization header stays in this process.
            response = await openai_request(self.oai, parsed, kind)
            if hasattr(response, "body_iterator"):
                response.body_iterator = _counted(response.body_iterator, release)
                weakref.finalize(response, release)
                streaming = True
            return response
        except EngineUnavailable as e:
            return error(503, f"{e}; try again", "server_error", code="engine_unavailable")
        except Exception as e:  # noqa: BLE001 - vLLM's 4xx (and any failure) as OpenAI error JSON
            status = getattr(e, "status_code", 500)
            return error(
                status,
                str(getattr(e, "message", None) or e),
                "invalid_request_error" if status < 500 else "server_error",
            )
        finally:
            if not streaming:
                release()

    def _release(self) -> None:
        self.in_flight -= 1

    async def _body(self, request: Any) -> bytes | None:
        """The body, or None once it is over the limit (read no further than that)."""
        limit = self.limits["max_body_bytes"]
        if int(request.headers.get("content-length") or 0) > limit:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _live(self, parsed: Any, kind: str, prompt_ids: list[int]) -> Any:
        """One request on the job's engines, between its SPIN batches, with the validated
        request's settings. Not run again if its engine is lost: a request that kills engines
        must not use up the job's replacements."""
        params = {k: getattr(parsed, k) for k in ("temperature", "top_p", "seed", "stop")}
        params = {k: v for k, v in params.items() if v is not None} | {"max_tokens": parsed.max_tokens}
        async with self.live_turn:
            out = await self.engines.complete(prompt_ids, params)
        reply = {
            "id": f"{kind}-{uuid.uuid4().hex}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": f"{parsed.model}-iter-{iteration_of(out['serving']) or 0}",
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": out["tokens"],
                "total_tokens": len(prompt_ids) + out["tokens"],
            },
        }
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]}}
        else:
            choice = {"index": 0, "text": out["text"]}
        reply["choices"] = [choice | {"finish_reason": out["finish"]}]
        if parsed.stream:
            return StreamingResponse(_events(reply, kind), media_type="text/event-stream")
        return JSONResponse(reply)

    def _check(self, body: dict, kind: str) -> tuple[Any, list[int]]:
        """Model, numbers in range, prompt length: OpenAI's error shapes, our limits; returns
        (an error response or None, the prompt's token ids)."""
        names = sorted(self.tokenizers)
        model = body.get("model", names[0] if len(names) == 1 else None)
        if not isinstance(model, str):  # a list or dict is not even hashable: `in` would raise, a 500
            return error(400, f"model must be a string, one of {names}", "invalid_request_error", "model"), []
        if model not in self.tokenizers:
            return error(
                404,
                f"model {model!r} is not served here; models: {names}",
                "invalid_request_error",
                "model",
                "model_not_found",
            ), []
        body["model"] = model
        limit = self.limits["max_tokens"]
        for param, low, high, integer in (
            ("max_completion_tokens", 1, limit, True),
            ("max_tokens", 1, limit, True),
            ("n", 1, 1, True),
            ("temperature", 0.0, 2.0, False),
            ("top_p", 1e-9, 1.0, False),
        ):
            if problem := _out_of_range(param, body.get(param), low, high, integer):
                return problem, []
        # Serve LLM's request model would take 1 or "yes" for true.
        if body.get("stream") is not None and not isinstance(body["stream"], bool):
            return error(400, "stream must be true or false", "invalid_request_error", "stream"), []
        # Null or absent means the limit; 0 is refused above (`or` took it for unset).
        max_tokens = body.pop("max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        body["max_tokens"] = limit if max_tokens is None else max_tokens
        try:
            tokenizer = self.tokenizers[model]
            if kind == "chat":
                messages = body["messages"]
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            else:
                ids = _completion_prompt(body.get("prompt"), tokenizer)
        except Exception as e:  # noqa: BLE001 - any malformed prompt
            field = "messages" if kind == "chat" else "prompt"
            return error(400, f"{field} could not be read: {e!r}", "invalid_request_error", field), []
        if len(ids) > self.limits["max_prompt_tokens"]:
            message = f"the prompt has {len(ids)} tokens; this server takes at most {self.limits['max_prompt_tokens']}"
            return error(400, message, "invalid_request_error", "messages", "context_length_exceeded"), []
        return None, ids


def _out_of_range(param: str, value: Any, low: float, high: float, integer: bool) -> Any:
    """The 400 for a number outside [low, high] or not a JSON number (null: unset, none); a bool
    is an int to Python, so `true` would pass as 1."""
    kinds = (int,) if integer else (int, float)
    if value is None or (type(value) in kinds and low <= value <= high):
        return None
    if low == high:
        return error(400, f"only {param}={low:g} is supported", "invalid_request_error", param)
    kind = "an integer" if integer else "a number"
    return error(400, f"{param} must be {kind} in [{low:g}, {high:g}]", "invalid_request_error", param)


def _completion_prompt(prompt: Any, tokenizer: Any) -> list[int]:
    """One prompt per request (n=1): a string or token ids, alone or in a list of one; a batch of
    prompts would slip past the per-prompt limits."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    vocab = len(tokenizer)
    if isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < vocab for t in prompt):
        return prompt
    raise ValueError(f"one prompt per request: a string, or a list of token ids in [0, {vocab})")


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = False

    def once() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return once


async def _counted(events: Any, release: Callable[[], None]) -> Any:
    try:
        async for event in events:
            yield event
    finally:
        release()


def _events(reply: dict, kind: str) -> Iterator[str]:
    """A finished live answer as OpenAI's server-sent events: the text, then the finish reason."""
    choice = reply["choices"][0]
    chunk = {k: v for k, v in reply.items() if k not in ("choices", "usage")}
    chunk["object"] = "chat.completion.chunk" if kind == "chat" else "text_completion"
    if kind == "chat":
        text = {"index": 0, "delta": {"role": "assistant", "content": choice["message"]["content"]}}
        last = {"index": 0, "delta": {}}
    else:
        text, last = {"index": 0, "text": choice["text"]}, {"index": 0, "text": ""}
    for part in (text | {"finish_reason": None}, last | {"finish_reason": choice["finish_reason"]}):
        yield f"data: {json.dumps(chunk | {'choices': [part]})}\n\n"
    yield "data: [DONE]\n\n"


def check_exposure(host: str, api_key: str | None, env: str) -> None:
    """A keyless endpoint is for this machine only: anyone who can reach it could use the engines."""
    if not api_key and host not in ("localhost", "127.0.0.1", "::1"):
        raise ValueError(
            f"host {host} exposes the endpoint beyond this machine without a key: set {env} to a bearer key, "
            "or bind 127.0.0.1 (serve.host; in a Serve config file, http_options.host)"
        )


def key_digest(api_key: str | None) -> str | None:
    """What the gateway keeps of the key: its SHA-256 (the key itself never enters Ray)."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None
