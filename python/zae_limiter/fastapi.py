"""Per-route rate limits for FastAPI (`pip install "zae-limiter[fastapi]"`).

```python
from zae_limiter.asgi import header_key
from zae_limiter.fastapi import RateLimit, install

limited = RateLimit(limiter=limiter, limits=[Limit.per_minute("rpm", 100)],
                    key=header_key("x-api-key"), resource="search")
install(app)  # refusals as application/problem+json

@app.get("/search")
async def search(lease: Annotated[Lease | None, Depends(limited)]) -> dict[str, str]:
    ...
```

The dependency admits through the same `Gate` as `zae_limiter.asgi.RateLimitMiddleware`, so
the fields and refusals are the same. It yields the lease (None when `key` gives None); the
consumption stands when the request ends and is given back if the handler raises. A handler
that returns its own `Response` (a `StreamingResponse`, say) gets the fields from
`fields_of(request)`: FastAPI adds the dependency's headers only to responses it builds.
Reconciling is the handler's: it has the lease (`await lease.adjust(tpm=real - estimate)`),
also inside a streaming body, since the dependency ends after the response is sent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from fastapi import FastAPI, HTTPException, Request, Response

from .asgi import DEFAULT_HTTP_RESOURCE, Gate, Scope
from .exceptions import ValidationError
from .lease import Lease
from .limiter import RateLimiter
from .models import FailureMode, Limit
from .ratelimit_fields import Refusal

__all__ = ["RateLimit", "RateLimitRefused", "fields_of", "install", "refusal_response"]

_STATE_KEY = "zae_limiter_fields"
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


def install(app: FastAPI) -> None:
    """Answer `RateLimitRefused` with its problem+json body."""
    app.add_exception_handler(RateLimitRefused, refusal_response)


def fields_of(request: Request) -> dict[str, str]:
    """The RateLimit fields of this request's admission (empty when none was made)."""
    found = request.scope.get("state", {}).get(_STATE_KEY)
    return dict(found) if isinstance(found, Mapping) else {}


class RateLimit:
    """A FastAPI dependency limiting the routes that use it: `Depends(RateLimit(...))`.

    The options are `zae_limiter.asgi.Gate`'s, with `key(scope) -> str | None` choosing the
    entity (None: not limited)."""

    def __init__(
        self,
        *,
        limiter: RateLimiter,
        limits: Sequence[Limit] | None,
        key: Callable[[Scope], str | None],
        resource: str | Callable[[Scope], str] = DEFAULT_HTTP_RESOURCE,
        cost: Callable[[Scope], Mapping[str, int]] | None = None,
        quota_units: Mapping[str, str] | None = None,
        cascade: bool = False,
        use_stored_limits: bool = False,
        failure_mode: FailureMode | None = None,
        deadline: float | None = None,
        partition_key: Callable[[Scope], bytes | None] | None = None,
        too_large_status: int = 413,
        unavailable_retry_after: int = 1,
    ) -> None:
        if not callable(key):
            raise ValidationError("key", key, "must be a callable of the scope")
        self.key = key
        self.gate = Gate(
            limiter=limiter,
            limits=limits,
            resource=resource,
            cost=cost,
            quota_units=quota_units,
            cascade=cascade,
            use_stored_limits=use_stored_limits,
            failure_mode=failure_mode,
            deadline=deadline,
            partition_key=partition_key,
            too_large_status=too_large_status,
            unavailable_retry_after=unavailable_retry_after,
        )

    async def __call__(self, request: Request, response: Response) -> AsyncIterator[Lease | None]:
        entity_id = self.key(request.scope)
        if entity_id is None:
            yield None
            return
        admitted = await self.gate.admit(entity_id, request.scope)
        if isinstance(admitted, Refusal):
            raise RateLimitRefused(admitted)
        for name, value in admitted.headers:
            response.headers[name] = value
        request.scope.setdefault("state", {})[_STATE_KEY] = dict(admitted.headers)
        try:
            yield admitted.lease
        except BaseException as exc:
            await admitted.leave(exc)
            raise
        await admitted.leave()
