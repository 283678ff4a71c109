"""The gateway: `POST /v1/chat/completions` for API keys, rate limited per key and per project.

A request goes through three layers, outermost first:

1. `ReadChatRequest` (here): the bearer token names the API key's entity (401 otherwise), and
   the JSON body is read and checked (400, 404 for an unknown model, 413 over `MAX_BODY_BYTES`).
   `RateLimitMiddleware` calls its `cost` with the ASGI scope alone, before anyone has read the
   body, so the estimate, which needs `max_tokens` and the prompt, is made here and handed on
   in the scope; the body is replayed to the layers below. Bad requests never reach DynamoDB.
2. `zae_limiter.http.asgi.RateLimitMiddleware`: one acquire for the key, with cascade to its
   project (both with stored limits), of what `Meter.cost` says: `rpm` 1, the estimate on `tpm`
   and on every token quota, and one slot of each concurrency cap for a stream (0 otherwise). A
   refusal is its 429 (or 413 for an estimate above a burst); the RateLimit fields go on every
   admitted response. A stream's slots are held until its body ends or the client leaves.
3. `completions`: the simulated model answers, as JSON or as an SSE stream.

Once the body has been sent, `Meter.reconcile` replaces the estimate with the usage the model
reported (`usage.total_tokens` at the end of the body), on `tpm` and on the quotas; a stream the
client left before its usage chunk is billed for the tokens generated until then.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, request_response

from zae_limiter import Limit, RateLimiter, ValidationError
from zae_limiter.http.asgi import (
    ASGIApp,
    Message,
    RateLimitMiddleware,
    Receive,
    Scope,
    Send,
    Served,
    send_refusal,
    total_tokens,
)
from zae_limiter.http.fields import Refusal

from .chat import MODELS, ChatRequest
from .model import Generation

# The resource every key's and the project's limits are stored for.
RESOURCE: Final = "chat-completions"
REQUESTS: Final = "rpm"
TOKENS: Final = "tpm"
MAX_BODY_BYTES: Final = 1 << 20
CALL_KEY: Final = "llm_gateway.call"
GENERATION_KEY: Final = "llm_gateway.generation"


@dataclass(frozen=True)
class Call:
    """An authenticated, well-formed request: who asks, and what."""

    entity_id: str
    request: ChatRequest


def call_of(scope: Mapping[str, Any]) -> Call:
    call = scope[CALL_KEY]
    assert isinstance(call, Call), "ReadChatRequest must run before the rate limiter"
    return call


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _problem(status: int, title: str, detail: str, **extra: Any) -> Refusal:
    headers = [("www-authenticate", "Bearer")] if status == 401 else []
    problem = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return Refusal.problem(status, problem, headers)


class ReadChatRequest:
    """Authenticates the API key and reads the request before the rate limiter sees it."""

    def __init__(self, app: ASGIApp, *, api_keys: Mapping[str, str]) -> None:
        self.app = app
        self.api_keys = dict(api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        entity_id = None if token is None else self.api_keys.get(token)
        if entity_id is None:
            await send_refusal(
                send, _problem(401, "Unauthorized", "Send a valid API key: Authorization: Bearer")
            )
            return
        body = await _read_body(receive, MAX_BODY_BYTES)
        if body is None:
            detail = f"The request body exceeds {MAX_BODY_BYTES} bytes."
            await send_refusal(send, _problem(413, "Content Too Large", detail))
            return
        try:
            request = ChatRequest.parse(body)
        except ValidationError as exc:
            status, title = (404, "Not Found") if exc.field == "model" else (400, "Bad Request")
            await send_refusal(send, _problem(status, title, str(exc), param=exc.field))
            return
        inner = {**scope, CALL_KEY: Call(entity_id, request)}
        await self.app(inner, _replay(body, receive), send)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it passes `limit` bytes."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            break
    return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the layers below: the body already read, then the server's messages (the
    disconnect a streaming response listens for)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def entity_of(scope: Scope) -> str:
    return call_of(scope).entity_id


@dataclass(frozen=True)
class Meter:
    """What a request costs, by the names of the keys' limits (`provision.check_limits` says
    which are allowed): `rpm` counts requests; `tpm` and every quota count tokens; every
    concurrency cap counts streams.

    A cost names every cap, with 0 slots for a request that does not stream: the limiter takes
    one slot of a cap the cost leaves out. With cascade the project's limits are taken with the
    same amounts, so a project's cap must be one the keys have too."""

    tokens: tuple[str, ...] = (TOKENS,)
    streams: tuple[str, ...] = ()

    @classmethod
    def of(cls, key_limits: Sequence[Limit]) -> Meter:
        tokens = tuple(lim.name for lim in key_limits if lim.name == TOKENS or lim.is_quota)
        streams = tuple(lim.name for lim in key_limits if lim.is_concurrency)
        return cls(tokens, streams)

    @property
    def units(self) -> dict[str, str]:
        """The RateLimit fields' quota units (`qu`): requests are the default."""
        return {name: "tokens" for name in self.tokens}

    def cost(self, scope: Scope) -> dict[str, int]:
        request = call_of(scope).request
        slots = 1 if request.stream else 0
        return {
            REQUESTS: 1,
            **{name: request.estimate for name in self.tokens},
            **{name: slots for name in self.streams},
        }

    def reconcile(self, served: Served) -> dict[str, int] | None:
        """The real token count: the usage the model reported, or (a stream the client left)
        what it generated until then; None keeps the estimate."""
        tokens = total_tokens(served.tail)
        if tokens is None:
            generation = served.scope.get(GENERATION_KEY)
            if isinstance(generation, Generation):
                tokens = generation.total_tokens
        return None if tokens is None else {name: tokens for name in self.tokens}


def create_app(
    limiter: RateLimiter,
    api_keys: Mapping[str, str],
    *,
    token_delay: float = 0.0,
    meter: Meter = Meter(),
) -> Starlette:
    """The gateway over `limiter`, whose table holds the keys' and the project's stored limits
    (`provision`); `api_keys` maps each bearer token to its entity id; `meter` prices requests
    for the keys' limits (`Meter.of`). The limiter is closed when the application shuts down."""

    async def completions(request: Request) -> Response:
        generation = Generation.start(call_of(request.scope).request)
        # `reconcile` finds it here: `Served.scope` is the scope this application was called with.
        request.scope[GENERATION_KEY] = generation
        if generation.request.stream:
            return StreamingResponse(
                generation.stream(token_delay),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        return JSONResponse(await generation.complete(token_delay))

    limited = RateLimitMiddleware(
        request_response(completions),
        limiter=limiter,
        limits=None,
        key=entity_of,
        resource=RESOURCE,
        cost=meter.cost,
        quota_units=meter.units,
        cascade=True,
        use_stored_limits=True,
        reconcile=meter.reconcile,
    )

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        data = [{"id": m, "object": "model", "owned_by": "llm-gateway"} for m in MODELS]
        return JSONResponse({"object": "list", "data": data})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # Here, before the server returns: on Ctrl+C the event loop cancels what follows it.
        await limiter.close()

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route(
            "/v1/chat/completions",
            ReadChatRequest(limited, api_keys=api_keys),
            methods=["POST"],
        ),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
