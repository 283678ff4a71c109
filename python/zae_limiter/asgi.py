"""Rate limiting in front of any ASGI application: `RateLimitMiddleware`.

Pure ASGI (no framework needed): only "http" scopes are limited, lifespan and websocket scopes
pass through. Per request the middleware picks the entity (`key`), takes the cost with one
`acquire`, answers a refusal itself (429, 413, 503, 400: problem+json, see
`zae_limiter.ratelimit_fields`), and otherwise calls the application with the lease in the scope
(`lease_of(scope)`), adding the RateLimit fields to its response from the decision already
made (no further DynamoDB call). Once the body has been sent, a 5xx gives the cost back and the
`reconcile` hook's real cost is applied with `lease.adjust`. docs/http.md is the guide.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from .exceptions import (
    InvalidIdentifierError,
    RateLimiterUnavailable,
    RateLimitExceeded,
    ValidationError,
)
from .lease import Lease, LeaseScope
from .limiter import RateLimiter
from .models import FailureMode, Limit, LimitStatus
from .ratelimit_fields import REQUESTS, Refusal, check_units, policy_field, ratelimit_field
from .validation import validate_resource

__all__ = [
    "LEASE_SCOPE_KEY",
    "Admission",
    "Gate",
    "RateLimitMiddleware",
    "Served",
    "client_address_key",
    "header_key",
    "lease_of",
    "send_refusal",
    "total_tokens",
]

log = logging.getLogger("zae_limiter")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LEASE_SCOPE_KEY: Final = "zae_limiter.lease"
DEFAULT_HTTP_RESOURCE: Final = "http"
# Enough for the end of an SSE stream (an OpenAI completion's usage chunk and `[DONE]`).
DEFAULT_TAIL_BYTES: Final = 16 * 1024
POLICY_CACHE_SIZE: Final = 1024


def lease_of(scope: Mapping[str, Any]) -> Lease | None:
    """The lease the middleware took for this request (None: not limited)."""
    lease = scope.get(LEASE_SCOPE_KEY)
    return lease if isinstance(lease, Lease) else None


def header_key(name: str) -> Callable[[Scope], str | None]:
    """A `key` taking the entity id from a request header (absent: not limited)."""
    wanted = name.lower().encode("latin-1")

    def key(scope: Scope) -> str | None:
        for header, value in scope.get("headers", ()):
            if header == wanted:
                return bytes(value).decode("latin-1").strip() or None
        return None

    return key


def client_address_key(scope: Scope) -> str | None:
    """A `key` taking the entity id from the client's address."""
    client = scope.get("client")
    return str(client[0]) if client else None


_TOTAL_TOKENS: Final = re.compile(rb'"total_tokens"\s*:\s*(\d+)')


def total_tokens(tail: bytes) -> int | None:
    """The last `usage.total_tokens` in a body's tail: an OpenAI-shaped chat completion, plain
    JSON or SSE (`stream_options.include_usage`: the last data chunk carries the usage). A
    "total_tokens" inside generated text is JSON-escaped, so it never matches."""
    found = _TOTAL_TOKENS.findall(tail)
    return int(found[-1]) if found else None


@dataclass(frozen=True)
class Served:
    """What the application answered, for the `reconcile` hook."""

    scope: Scope
    status: int | None
    """The response status (None: the application started no response)."""
    headers: list[tuple[bytes, bytes]]
    tail: bytes
    """The last `tail_bytes` bytes of the body sent."""
    body_bytes: int
    chunks: int
    """Non-empty body messages sent."""
    complete: bool
    """The application sent the end of the body."""
    disconnected: bool
    """The client went away before the end (the server said `http.disconnect`)."""
    consumed: dict[str, int]
    """What the lease holds: the estimate the hook corrects."""


ReconcileResult = Mapping[str, int] | None
Reconcile = Callable[[Served], ReconcileResult | Awaitable[ReconcileResult]]


class Admission:
    """An admitted request: its lease, the fields for its response, and how to end it."""

    __slots__ = ("_scope", "entity_id", "headers", "lease")

    def __init__(
        self, entity_id: str, scope: LeaseScope, lease: Lease, headers: list[tuple[str, str]]
    ) -> None:
        self.entity_id = entity_id
        self.lease = lease
        self.headers = headers
        self._scope = scope

    async def leave(self, exc: BaseException | None = None) -> None:
        """End the acquire: the consumption stands, or (`exc`) it is given back."""
        if exc is None:
            await self._scope.__aexit__(None, None, None)
        else:
            await self._scope.__aexit__(type(exc), exc, exc.__traceback__)


class Gate:
    """How one set of routes is limited: the limits, the resource, the cost per request and the
    answers to refusals. The middleware and the FastAPI dependency both admit through it.

    `quota_units` names the unit of each limit that does not count requests (e.g.
    `{"tpm": "tokens"}`); every other limit counts requests. The default `cost` is one of each
    limit that counts requests.
    """

    def __init__(
        self,
        *,
        limiter: RateLimiter,
        limits: Sequence[Limit] | None,
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
        if not isinstance(limiter, RateLimiter):
            raise ValidationError("limiter", limiter, "must be a RateLimiter")
        self.limiter = limiter
        self.limits = list(limits or [])
        if not self.limits and not use_stored_limits:
            raise ValidationError("limits", limits, "give limits, or use_stored_limits=True")
        if isinstance(resource, str):
            validate_resource(resource)
        elif not callable(resource):
            raise ValidationError("resource", resource, "must be a str or a callable of the scope")
        self.resource = resource
        self.units = check_units(quota_units)
        if cost is None:
            counted = {lim.name: 1 for lim in self.limits if self.unit(lim.name) == REQUESTS}
            if not counted:
                raise ValidationError("cost", cost, "no limit counts requests: give cost=")
            self._fixed_cost: dict[str, int] | None = counted
        elif callable(cost):
            self._fixed_cost = None
        else:
            raise ValidationError("cost", cost, "must be a callable of the scope, or None")
        self.cost = cost
        self.cascade = cascade
        self.use_stored_limits = use_stored_limits
        self.failure_mode = failure_mode
        self.deadline = deadline
        self.partition_key = partition_key
        if too_large_status not in (400, 413, 422):
            raise ValidationError("too_large_status", too_large_status, "must be 400, 413 or 422")
        self.too_large_status = too_large_status
        if (
            isinstance(unavailable_retry_after, bool)
            or not isinstance(unavailable_retry_after, int)
            or unavailable_retry_after < 1
        ):
            raise ValidationError(
                "unavailable_retry_after", unavailable_retry_after, "must be a whole second >= 1"
            )
        self.unavailable_retry_after = unavailable_retry_after
        self._policies: dict[tuple[Limit, ...], str] = {}

    def unit(self, limit_name: str) -> str:
        return self.units.get(limit_name, REQUESTS)

    def amounts(self, scope: Scope) -> Mapping[str, int]:
        if self._fixed_cost is not None:
            return self._fixed_cost
        assert self.cost is not None
        return self.cost(scope)

    async def admit(self, entity_id: str, scope: Scope) -> Admission | Refusal:
        """Take this request's cost for `entity_id`, or say how to refuse it."""
        resource = self.resource if isinstance(self.resource, str) else self.resource(scope)
        pk = None if self.partition_key is None else self.partition_key(scope)
        options: dict[str, Any] = {}
        if self.deadline is not None:
            options["deadline"] = self.deadline
        acquisition = self.limiter.acquire(
            entity_id,
            resource,
            self.limits,
            self.amounts(scope),
            cascade=self.cascade,
            use_stored_limits=self.use_stored_limits,
            failure_mode=self.failure_mode,
            **options,
        )
        try:
            lease = await acquisition.__aenter__()
        except RateLimitExceeded as exc:  # RequestTooLarge included
            return Refusal.exceeded(exc, entity_id, self.units, pk, self.too_large_status)
        except RateLimiterUnavailable:
            return Refusal.unavailable(self.unavailable_retry_after)
        except InvalidIdentifierError as exc:
            if exc.field != "entity_id":
                raise
            return Refusal.bad_key()
        own = [s for s in lease.statuses() if s.entity_id == entity_id]
        return Admission(entity_id, acquisition, lease, self._fields(own, pk))

    def _fields(self, own: list[LimitStatus], pk: bytes | None) -> list[tuple[str, str]]:
        if not own:  # a fail-open lease saw no bucket
            return []
        # The policy changes only with the limits (stored limits may differ per entity).
        limits = tuple(s.limit for s in own)
        policy = self._policies.get(limits) if pk is None else None
        if policy is None:
            policy = policy_field(own, self.units, pk)
            if pk is None and len(self._policies) < POLICY_CACHE_SIZE:
                self._policies[limits] = policy
        return [("ratelimit-policy", policy), ("ratelimit", ratelimit_field(own, pk))]


async def send_refusal(send: Send, refusal: Refusal) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": refusal.status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in refusal.headers],
        }
    )
    await send({"type": "http.response.body", "body": refusal.body, "more_body": False})


@dataclass
class _Watch:
    """The request's receive and send as the application sees them: adds the fields to the
    response start and records what the reconciliation needs."""

    receive_: Receive
    send_: Send
    extra: list[tuple[bytes, bytes]]
    tail_bytes: int
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    tail: bytearray = field(default_factory=bytearray)
    body_bytes: int = 0
    chunks: int = 0
    complete: bool = False
    disconnected: bool = False

    async def receive(self) -> Message:
        message = await self.receive_()
        # After the end of the body, a server answers every receive with a disconnect.
        if message["type"] == "http.disconnect" and not self.complete:
            self.disconnected = True
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self.headers = list(message.get("headers", ()))
            if self.extra:
                message = {**message, "headers": [*self.headers, *self.extra]}
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if body:
                self.chunks += 1
                self.body_bytes += len(body)
                if self.tail_bytes:
                    self.tail += body
                    if len(self.tail) > self.tail_bytes:
                        del self.tail[: len(self.tail) - self.tail_bytes]
            if not message.get("more_body", False):
                self.complete = True
        elif kind == "http.response.pathsend":  # the server sends a file: the whole body
            self.complete = True
        try:
            await self.send_(message)
        except OSError:  # a server of ASGI spec 2.4 says a client went away this way
            self.disconnected = True
            raise


class RateLimitMiddleware:
    """Limits every HTTP request of `app` through `limiter` (see `Gate` for the options).

    - `key(scope) -> str | None`: the entity id (None: the request is not limited); an id the
      limiter rejects is answered 400.
    - `reconcile(served) -> {limit: real cost} | None` (may be async): called once the body has
      been sent, also when the client disconnected mid-stream; the lease is adjusted to the real
      cost of each limit named. Not called for a 5xx when `refund_on_server_error` (the
      default): the whole cost is given back instead.
    - If the application raises, the cost is given back and the exception propagates, as in
      `acquire` (unless the client had disconnected: then it is reconciled).
    """

    def __init__(
        self,
        app: ASGIApp,
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
        reconcile: Reconcile | None = None,
        refund_on_server_error: bool = True,
        tail_bytes: int = DEFAULT_TAIL_BYTES,
        partition_key: Callable[[Scope], bytes | None] | None = None,
        too_large_status: int = 413,
        unavailable_retry_after: int = 1,
    ) -> None:
        if not callable(key):
            raise ValidationError("key", key, "must be a callable of the scope")
        if reconcile is not None and not callable(reconcile):
            raise ValidationError("reconcile", reconcile, "must be a callable or None")
        if isinstance(tail_bytes, bool) or not isinstance(tail_bytes, int) or tail_bytes < 0:
            raise ValidationError("tail_bytes", tail_bytes, "must be a non-negative int")
        self.app = app
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
        self.reconcile = reconcile
        self.refund_on_server_error = refund_on_server_error
        self.tail_bytes = tail_bytes if reconcile is not None else 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entity_id = self.key(scope)
        if entity_id is None:
            await self.app(scope, receive, send)
            return
        admitted = await self.gate.admit(entity_id, scope)
        if isinstance(admitted, Refusal):
            await send_refusal(send, admitted)
            return
        extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in admitted.headers]
        watch = _Watch(receive, send, extra, self.tail_bytes)
        inner = {**scope, LEASE_SCOPE_KEY: admitted.lease}
        try:
            await self.app(inner, watch.receive, watch.send)
        except BaseException as exc:
            if watch.disconnected and isinstance(exc, Exception):
                await self._settle(admitted.lease, watch, inner)
                await admitted.leave()
            else:
                await admitted.leave(exc)
            raise
        await self._settle(admitted.lease, watch, inner)
        await admitted.leave()

    async def _settle(self, lease: Lease, watch: _Watch, scope: Scope) -> None:
        """Give the cost back after a 5xx, or apply the hook's real cost (errors are logged:
        the response is gone, and the estimate stands)."""
        try:
            failed = watch.status is None or watch.status >= 500
            if failed and self.refund_on_server_error:
                held = {name: n for name, n in lease.consumed.items() if n > 0}
                if held:
                    await lease.release(**held)
                return
            if self.reconcile is None:
                return
            served = Served(
                scope=scope,
                status=watch.status,
                headers=watch.headers,
                tail=bytes(watch.tail),
                body_bytes=watch.body_bytes,
                chunks=watch.chunks,
                complete=watch.complete,
                disconnected=watch.disconnected,
                consumed=lease.consumed,
            )
            real = self.reconcile(served)
            if inspect.isawaitable(real):
                real = await real
            if real:
                held = lease.consumed
                deltas = {name: n - held.get(name, 0) for name, n in real.items()}
                if any(deltas.values()):
                    await lease.adjust(**{k: v for k, v in deltas.items() if v})
        except Exception:
            log.exception("reconciliation of %r failed; its estimate stands", lease)
