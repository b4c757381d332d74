"""The gateway's own rules, called as Serve calls it, with the job's engines replaced by a stand-in
that records what reaches it (the engines themselves are tested in test_serving)."""

import asyncio
import json

import pytest

from spin_ray.engines.client import EngineUnavailable
from spin_ray.serve.gateway import Gateway, key_digest

pytestmark = pytest.mark.e2e  # no cluster, but Serve LLM's request models import vLLM (~40 s)

LIMITS = {"max_tokens": 8, "max_prompt_tokens": 64, "max_body_bytes": 4096, "max_concurrency": 4}


class Request:
    """What the gateway reads of a Starlette request."""

    def __init__(self, body, headers: dict | None = None):
        self.raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.headers = {"content-type": "application/json", "host": "127.0.0.1:8000"} | (headers or {})
        self.read = 0

    async def stream(self):
        for i in range(0, len(self.raw), 1024):
            self.read += 1024
            yield self.raw[i : i + 1024]


class SlowEngines:
    """Answers once `go` is set; records the sampling settings each request reached it with."""

    def __init__(self):
        self.go = asyncio.Event()
        self.seen: list[dict] = []
        self.fail: Exception | None = None

    async def complete(self, prompt_ids, params):
        self.seen.append(params)
        await self.go.wait()
        if self.fail:
            raise self.fail
        return {"text": "46", "tokens": 2, "finish": "stop", "serving": "/run/iter_2/model"}


@pytest.fixture
def live(toy):
    engines = SlowEngines()
    return Gateway({"spin-live": str(toy.model_dir)}, LIMITS, None, engines=engines), engines


def chat(**extra) -> dict:
    return {"model": "spin-live", "messages": [{"role": "user", "content": "12+34="}], **extra}


def status(response) -> tuple[int, dict]:
    return response.status_code, json.loads(response.body)


@pytest.mark.parametrize("mode", ["live", "checkpoints"])
def test_client_disconnect_storm_leaves_nothing_in_flight(live, mode, monkeypatch):
    """Serve cancels a handler whose client went; in checkpoint mode a stream may also be dropped
    before its first event is read. Either way the request stops counting."""
    gateway, engines = live
    if mode == "checkpoints":  # Serve LLM's handling of the request, stood in for by the same slow engine
        from starlette.responses import StreamingResponse

        async def serve_llm(oai, parsed, kind):
            out = await engines.complete([], {})
            events = iter([f"data: {out['text']}\n\n"])
            return StreamingResponse(events) if parsed.stream else _json_response(out)

        monkeypatch.setattr("spin_ray.serve.gateway.openai_request", serve_llm)
        gateway.engines, gateway.oai = None, None

    async def storm():
        dropped = [asyncio.create_task(gateway._handle(Request(chat()), "chat")) for _ in range(3 * 4)]
        await asyncio.sleep(0.2)  # all in the engine's queue, or refused with 429 past 4
        assert gateway.in_flight == 4
        for task in dropped:
            task.cancel()  # what Serve does when the client goes
        await asyncio.gather(*dropped, return_exceptions=True)
        assert gateway.in_flight == 0
        engines.go.set()
        unread = [await gateway._handle(Request(chat(stream=True)), "chat") for _ in range(4)]
        assert gateway.in_flight == (4 if mode == "checkpoints" else 0)  # a stream counts until it ends
        del unread  # dropped before a single event was read
        assert gateway.in_flight == 0
        return await gateway._handle(Request(chat()), "chat")

    code, body = status(asyncio.run(storm()))
    assert code == 200 and "46" in json.dumps(body)


def _json_response(out):
    from starlette.responses import JSONResponse

    return JSONResponse({"choices": [{"message": {"content": out["text"]}}]})


def test_live_settings_are_the_validated_ones_and_a_lost_engine_is_a_503(live):
    gateway, engines = live
    engines.go.set()
    code, _ = status(asyncio.run(gateway._handle(Request(chat(seed="5", temperature=0.5, stop="\n")), "chat")))
    assert code == 200 and engines.seen[-1] == {"temperature": 0.5, "seed": 5, "stop": "\n", "max_tokens": 8}
    assert type(engines.seen[-1]["seed"]) is int
    engines.fail = EngineUnavailable("live request failed: ActorDiedError")
    code, body = status(asyncio.run(gateway._handle(Request(chat()), "chat")))
    assert code == 503 and body["error"]["code"] == "engine_unavailable" and gateway.in_flight == 0


def test_prompts_types_bodies_and_hosts(live):
    gateway, engines = live
    engines.go.set()

    def ask(body, kind="completions", **headers):
        return status(asyncio.run(gateway._handle(Request(body, headers), kind)))

    many = {"model": "spin-live", "prompt": ["12+34="] * 200}
    assert ask(many)[0] == 400 and "one prompt per request" in ask(many)[1]["error"]["message"]
    assert ask({"model": "spin-live", "prompt": [[5] * 65]})[1]["error"]["code"] == "context_length_exceeded"
    assert ask({"model": "spin-live", "prompt": [3, 4, 10**9]})[0] == 400  # not a token id
    assert ask({"model": "spin-live", "prompt": ["12+34="]})[0] == 200  # a list of one is one prompt
    assert ask({"model": "spin-live", "prompt": [3, 4, 5]})[0] == 200
    assert ask(chat(temperature="hot"), "chat")[1]["error"]["param"] == "temperature"
    assert ask(chat(max_tokens=9), "chat")[1]["error"]["param"] == "max_tokens"
    big = Request(chat(pad="x" * 100_000))
    assert status(asyncio.run(gateway._handle(big, "chat")))[0] == 413 and big.read <= 4096 + 1024  # read no further
    liar = Request(chat(), {"content-length": "999999"})
    assert status(asyncio.run(gateway._handle(liar, "chat")))[0] == 413 and liar.read == 0
    assert ask(chat(), "chat", **{"content-type": "text/plain"})[0] == 415
    assert ask(chat(), "chat", host="evil.example:8000")[0] == 403  # DNS rebinding onto a keyless localhost
    assert ask(chat(), "chat", host="[::1]:8000")[0] == 200
    assert gateway.in_flight == 0


def test_a_key_replaces_the_host_rule(toy):
    gateway = Gateway({"spin-live": str(toy.model_dir)}, LIMITS, key_digest("k"), engines=SlowEngines())
    gateway.engines.go.set()
    ok = Request(chat(), {"host": "spin.example.com", "authorization": "Bearer k"})
    assert status(asyncio.run(gateway._handle(ok, "chat")))[0] == 200
    assert status(asyncio.run(gateway._handle(Request(chat(), {"host": "spin.example.com"}), "chat")))[0] == 401


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", ["spin-live"]),  # unhashable: was a TypeError, a 500
        ("model", {"id": "spin-live"}),
        ("max_tokens", 0),  # was taken for unset: the limit
        ("max_tokens", True),  # a bool is an int to Python: was max_tokens=1
        ("max_completion_tokens", 0),
        ("max_completion_tokens", False),
        ("max_completion_tokens", 9),
        ("temperature", True),
        ("top_p", False),
        ("n", True),
        ("stream", 1),  # Serve LLM's request model took 1 or "yes" for true
        ("stream", "yes"),
    ],
)
def test_wrong_json_types_are_400s_naming_their_field(live, field, value):
    gateway, engines = live
    engines.go.set()
    code, body = status(asyncio.run(gateway._handle(Request(chat(**{field: value})), "chat")))
    assert code == 400 and body["error"]["param"] == field and body["error"]["type"] == "invalid_request_error", body
    assert engines.seen == [] and gateway.in_flight == 0


def test_null_limits_mean_unset_and_max_completion_tokens_wins(live):
    gateway, engines = live
    engines.go.set()
    for extra, sent in (
        ({"max_tokens": None, "n": None, "stream": None, "temperature": None}, 8),
        ({"max_completion_tokens": 3, "max_tokens": 5}, 3),
        ({"max_completion_tokens": None, "max_tokens": 5}, 5),
    ):
        code, body = status(asyncio.run(gateway._handle(Request(chat(**extra)), "chat")))
        assert code == 200 and engines.seen[-1]["max_tokens"] == sent, (extra, body)
