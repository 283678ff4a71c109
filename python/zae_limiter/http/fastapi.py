"""Per-route rate limits for FastAPI (`pip install "zae-limiter[fastapi]"`).

```python
from zae_limiter.asgi import hashed_header_key
from zae_limiter.fastapi import RateLimit, install

limited = RateLimit(limiter=limiter, limits=[Limit.per_minute("rpm", 100)],
                    key=hashed_header_key("x-api-key", SECRET), resource="search")
install(app)  # refusals as application/problem+json, and the response status for charging

@app.get("/search")
async def search(lease: Annotated[Lease | None, Depends(limited)]) -> dict[str, str]:
    ...
```

The dependency admits through the same `Gate` as `zae_limiter.asgi.RateLimitMiddleware`, so
the fields and refusals are the same, and it charges by the same rule (`zae_limiter.asgi.charged`):
a response status below 500 is charged whatever happens after, an `HTTPException` with a 4xx
included; a 5xx, or an exception with no response, gives the cost back. It yields the lease
(None when the request passes unlimited, `missing_key="pass"`). A handler that returns its own
`Response` (a `StreamingResponse`, say) gets the fields from `fields_of(request)`: FastAPI adds
the dependency's headers only to responses it builds. Reconciling is the handler's: it has the
lease (`await lease.adjust(tpm=real - estimate)`), also inside a streaming body, since the
dependency ends after the response is sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..lease import Lease
from ..limiter import RateLimiter
from ..models import FailureMode, Limit
from .asgi import ASGIApp, Gate, Receive, Send, charged, key_of
from .fields import Refusal
from .options import UNSET, HttpOptions, KeyFunction, MissingKey, Scope, Unset

__all__ = [
    "RateLimit",
    "RateLimitRefused",
    "StatusWatch",
    "fields_of",
    "install",
    "refusal_response",
]

_STATE_KEY = "zae_limiter_fields"
_STATUS_KEY = "zae_limiter.status"
_BODY_HEADERS = frozenset({"content-type", "content-length"})


class RateLimitRefused(HTTPException):
    """A refused request (429, 413, 503, 400). With `install(app)` it is answered with its
    problem+json body; without, FastAPI's own handler still sends its status and header fields
    (the body then is `{"detail": <the problem>}`)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(
            refusal.status,
            json.loads(refusal.body),
            {k: v for k, v in refusal.headers if k not in _BODY_HEADERS},
        )
        self.refusal = refusal


def refusal_response(request: Request, exc: Exception) -> Response:
    """The exception handler `install` registers for `RateLimitRefused`."""
    if not isinstance(exc, RateLimitRefused):
        raise exc
    refusal = exc.refusal
    headers = {k: v for k, v in refusal.headers if k != "content-length"}
    return Response(refusal.body, refusal.status, headers)


class _Status:
    __slots__ = ("pending", "status")

    def __init__(self) -> None:
        self.status: int | None = None
        # Admissions whose exception came before any response: ended once the status the
        # application's exception handlers answered with is known (None: none did).
        self.pending: list[Callable[[int | None], Awaitable[None]]] = []


class StatusWatch:
    """ASGI middleware `install` adds: records the response status each request was sent, so
    the dependency charges by it. An exception after the response (a failing background task,
    a cancellation) is charged by the status already sent; one before it, by the status the
    application's exception handlers answer with (a handler turning `PermissionError` into a
    403: charged), or given back when none does (the server's 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = _Status()
        scope[_STATUS_KEY] = seen

        async def watched(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen.status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            if seen.pending:
                await asyncio.shield(_end_all(seen))


async def _end_all(seen: _Status) -> None:
    for end in seen.pending:
        await end(seen.status)


def install(app: FastAPI) -> None:
    """Answer `RateLimitRefused` with its problem+json body, and watch response statuses for
    the charging rule (`StatusWatch`). Without it, a route's `HTTPException` is still charged
    by its status, but an exception raised after the response was sent gives the cost back."""
    app.add_exception_handler(RateLimitRefused, refusal_response)
    app.add_middleware(StatusWatch)


def fields_of(request: Request) -> dict[str, str]:
    """The RateLimit fields of this request's admission (empty when none was made)."""
    found = request.scope.get("state", {}).get(_STATE_KEY)
    return dict(found) if isinstance(found, Mapping) else {}


def _watched(request: Request) -> _Status | None:
    seen = request.scope.get(_STATUS_KEY)
    return seen if isinstance(seen, _Status) else None


def _status_of(exc: BaseException) -> int | None:
    """The status `exc` will be answered with, as far as the dependency can tell alone."""
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code
    if isinstance(exc, RequestValidationError):
        return 422  # FastAPI's own handler (the request's body or parameters)
    return None


class RateLimit:
    """A FastAPI dependency limiting the routes that use it: `Depends(RateLimit(...))`.

    The options are `zae_limiter.http.options.HttpOptions` (`options=`, or its fields as
    keywords; keywords given with `options=` replace those fields), as the middleware's:
    `key(scope) -> str | None` chooses the entity, `missing_key` says what a request with no
    key gets ("refuse": 401, the default; "pass": unlimited, the dependency yields None; or a
    fallback key function) and `refund_on_server_error` follows `zae_limiter.asgi.charged`."""

    def __init__(
        self,
        *,
        limiter: RateLimiter,
        limits: Sequence[Limit] | Unset | None = UNSET,
        key: KeyFunction | Unset = UNSET,
        missing_key: MissingKey | Unset = UNSET,
        resource: str | Callable[[Scope], str] | Unset = UNSET,
        cost: Callable[[Scope], Mapping[str, int]] | Unset | None = UNSET,
        quota_units: Mapping[str, str] | Unset | None = UNSET,
        cascade: bool | Unset = UNSET,
        use_stored_limits: bool | Unset = UNSET,
        failure_mode: FailureMode | Unset | None = UNSET,
        deadline: float | Unset | None = UNSET,
        refund_on_server_error: bool | Unset = UNSET,
        partition_key: Callable[[Scope], bytes | None] | Unset | None = UNSET,
        too_large_status: int | Unset = UNSET,
        unavailable_retry_after: int | Unset = UNSET,
        options: HttpOptions | None = None,
    ) -> None:
        self.options = HttpOptions.of(
            options,
            limits=limits,
            key=key,
            missing_key=missing_key,
            resource=resource,
            cost=cost,
            quota_units=quota_units,
            cascade=cascade,
            use_stored_limits=use_stored_limits,
            failure_mode=failure_mode,
            deadline=deadline,
            refund_on_server_error=refund_on_server_error,
            partition_key=partition_key,
            too_large_status=too_large_status,
            unavailable_retry_after=unavailable_retry_after,
        )
        self.gate = Gate(limiter=limiter, options=self.options)

    async def __call__(self, request: Request, response: Response) -> AsyncIterator[Lease | None]:
        entity_id = key_of(self.options.key, self.options.missing_key, request.scope)
        if entity_id is None:
            yield None
            return
        if isinstance(entity_id, Refusal):
            raise RateLimitRefused(entity_id)
        admitted = await self.gate.admit(entity_id, request.scope)
        if isinstance(admitted, Refusal):
            raise RateLimitRefused(admitted)
        for name, value in admitted.headers:
            response.headers[name] = value
        request.scope.setdefault("state", {})[_STATE_KEY] = dict(admitted.headers)
        refund = self.options.refund_on_server_error
        seen = _watched(request)
        try:
            yield admitted.lease
        except BaseException as exc:
            if seen is not None and seen.status is None:
                # No response yet: `StatusWatch` ends it by the one the handlers answer with.
                seen.pending.append(lambda status: admitted.end(charged(status, refund)))
                raise
            status = seen.status if seen is not None else _status_of(exc)
            await asyncio.shield(admitted.end(charged(status, refund)))
            raise
        # The response was sent (a dependency of scope="function" ends before it: the handler
        # returned, so a response is coming).
        status = seen.status if seen is not None else None
        await admitted.end(charged(200 if status is None else status, refund))
