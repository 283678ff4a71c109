"""Rate limiting in front of any ASGI application: `RateLimitMiddleware`.

Pure ASGI (no framework needed): only "http" scopes are limited, lifespan and websocket scopes
pass through. Per request the middleware picks the entity (`key`, then `missing_key` when the
key function gives None), takes the cost with one `acquire`, answers a refusal itself (429, 413,
503, 401, 403, 400: problem+json, see `zae_limiter.ratelimit_fields`), and otherwise calls the
application with the lease in the scope (`lease_of(scope)`), adding the RateLimit fields to its
response from the decision already made (no further DynamoDB call).

The charging rule (`charged`): once a response status below 500 was sent, the request is
charged whatever happens after (an exception, a cancellation, the client leaving), and the
`reconcile` hook's real cost is applied with `lease.adjust`. Only a 5xx, or an end with no
response at all, gives the cost back (`refund_on_server_error`). docs/http.md is the guide.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..exceptions import (
    EntityNotFoundError,
    InvalidIdentifierError,
    InvalidNameError,
    RateLimiterUnavailable,
    RateLimitExceeded,
    ResourceDisabled,
    ValidationError,
)
from ..lease import Lease, LeaseScope
from ..limiter import RateLimiter
from ..models import FailureMode, Limit, LimitStatus
from .fields import Refusal, policy_field, ratelimit_field

# Defined with the options; these names were this module's and are still imported from here.
from .options import DEFAULT_HTTP_RESOURCE as DEFAULT_HTTP_RESOURCE
from .options import DEFAULT_MISSING_KEY as DEFAULT_MISSING_KEY
from .options import UNSET, HttpOptions, KeyFunction, MissingKey, Unset, check_missing_key
from .options import Scope as Scope

__all__ = [
    "LEASE_SCOPE_KEY",
    "Admission",
    "Gate",
    "HttpOptions",
    "KeyFunction",
    "MissingKey",
    "RateLimitMiddleware",
    "Served",
    "address_key",
    "charged",
    "check_missing_key",
    "client_address_key",
    "hashed_entity_id",
    "hashed_header_key",
    "header_key",
    "key_of",
    "lease_of",
    "send_refusal",
    "total_tokens",
]

log = logging.getLogger("zae_limiter")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LEASE_SCOPE_KEY: Final = "zae_limiter.lease"
# Enough for the end of an SSE stream (an OpenAI completion's usage chunk and `[DONE]`).
DEFAULT_TAIL_BYTES: Final = 16 * 1024
POLICY_CACHE_SIZE: Final = 1024


def lease_of(scope: Mapping[str, Any]) -> Lease | None:
    """The lease the middleware took for this request (None: not limited)."""
    lease = scope.get(LEASE_SCOPE_KEY)
    return lease if isinstance(lease, Lease) else None


# 128 bits of HMAC-SHA256: no collision among any plausible number of keys (birthday bound
# 2**64), in an id of 32 hex digits.
HASH_HEX_DIGITS: Final = 32
MIN_SECRET_BYTES: Final = 16


def key_of(key: KeyFunction, missing_key: MissingKey, scope: Scope) -> str | Refusal | None:
    """The entity id of a request: `key`, else the fallback; a `Refusal` (401) when the request
    must be refused for want of a key, None when it passes unlimited (`missing_key="pass"`)."""
    entity_id = key(scope)
    if entity_id is not None:
        return entity_id
    if missing_key == "pass":
        return None
    if callable(missing_key):
        fallback = missing_key(scope)
        if fallback is not None:
            return fallback
    return Refusal.missing_key()


def _header(scope: Scope, wanted: bytes) -> str | None:
    for header, value in scope.get("headers", ()):
        if header == wanted:
            return bytes(value).decode("latin-1").strip() or None
    return None


def _header_name(name: object) -> bytes:
    if not isinstance(name, str) or not name or not name.isascii() or " " in name:
        raise ValidationError("name", name, "must be a header field name")
    return name.lower().encode("ascii")


def header_key(name: str) -> KeyFunction:
    """A `key` taking the entity id from a request header, as sent (absent or empty: None).

    The value becomes a partition key of the table and appears wherever entity ids do (audit,
    usage, metrics): for a secret (an API key) use `hashed_header_key`."""
    wanted = _header_name(name)
    return lambda scope: _header(scope, wanted)


def hashed_entity_id(value: str, secret: bytes) -> str:
    """The entity id `hashed_header_key(..., secret)` derives from `value`: the first 128 bits
    of HMAC-SHA256(secret, value) as 32 lowercase hex digits. Use it to create the entities and
    set their limits ahead of the requests."""
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise ValidationError("secret", "<secret>", f"must be at least {MIN_SECRET_BYTES} bytes")
    if not isinstance(value, str):
        raise ValidationError("value", type(value).__name__, "must be a str")
    digest = hmac.new(secret, value.encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:HASH_HEX_DIGITS]


def hashed_header_key(name: str, secret: bytes) -> KeyFunction:
    """A `key` deriving the entity id from a secret header (an API key) without storing it:
    `hashed_entity_id(value, secret)`. Keyed, so that whoever reads the table or the logs can
    neither recover a key nor test guesses against the ids without `secret` (at least 16
    random bytes, kept like any other secret; changing it changes every id). Absent or empty
    header: None."""
    wanted = _header_name(name)
    hashed_entity_id("", secret)  # the secret checked at once

    def key(scope: Scope) -> str | None:
        value = _header(scope, wanted)
        return None if value is None else hashed_entity_id(value, secret)

    return key


def _check_prefix(field_name: str, value: object, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bits:
        raise ValidationError(field_name, value, f"must be an int from 1 to {bits}")
    return value


def address_key(*, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> KeyFunction:
    """A `key` taking the entity id from the client's address, grouped by network prefix.

    One subscriber commonly holds a whole IPv6 /64 and may use a new address in it for every
    connection, so IPv6 clients are grouped by /64 by default; an IPv4-mapped IPv6 address
    counts as IPv4. A grouped id is the network's address then `@` and the prefix length
    (`2001:db8:1:2::@64`); an ungrouped one is the address itself. No client address (a Unix
    socket): None. The address is the peer's unless the server takes it from proxy headers
    (docs/http.md)."""
    v4 = _check_prefix("ipv4_prefix", ipv4_prefix, 32)
    v6 = _check_prefix("ipv6_prefix", ipv6_prefix, 128)

    def key(scope: Scope) -> str | None:
        client = scope.get("client")
        if not client:
            return None
        host = str(client[0])
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
        except ValueError:
            return host  # not an IP (a test client's name): as is, checked by the limiter
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        prefix = v4 if isinstance(address, ipaddress.IPv4Address) else v6
        if prefix == address.max_prefixlen:
            return str(address)
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        return f"{network.network_address}@{prefix}"

    return key


_by_address = address_key()


def client_address_key(scope: Scope) -> str | None:
    """A `key` taking the entity id from the client's address: `address_key()`'s (IPv4 per
    address, IPv6 per /64). No client address (a Unix socket): None."""
    return _by_address(scope)


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

    async def end(self, charge: bool) -> None:
        """End the acquire by the charging rule (`charged`): the consumption stands, or the
        whole of it is given back. A failed give-back is logged, not raised: the response is
        gone, and whatever the request ended with matters more."""
        if not charge:
            held = {name: n for name, n in self.lease.consumed.items() if n > 0}
            try:
                if held:
                    await self.lease.release(**held)
            except Exception:
                log.exception("give-back of a request's cost failed; it may not land")
        await self.leave()


def charged(status: int | None, refund_on_server_error: bool = True) -> bool:
    """The charging rule of the middleware and the FastAPI dependency: is a request whose
    response status is `status` (None: no response was started) charged?

    A status below 500 is charged, whatever happens after it was sent (an exception, a
    cancellation, the client leaving): the work was done, and a client must not earn a refund
    by leaving, nor a route that refuses it (401, 403, 404) become unlimited. A 5xx or no
    response at all is given back, unless `refund_on_server_error` is False."""
    if status is not None and status < 500:
        return True
    return not refund_on_server_error


class Gate:
    """How one set of routes is limited: `options` (the limits, the resource, the cost per
    request, the answers to refusals) through `limiter`. The middleware and the FastAPI
    dependency both admit through it."""

    def __init__(self, *, limiter: RateLimiter, options: HttpOptions) -> None:
        if not isinstance(limiter, RateLimiter):
            raise ValidationError("limiter", limiter, "must be a RateLimiter")
        self.limiter = limiter
        self.options = options
        self._policies: dict[tuple[Limit, ...], str] = {}

    async def admit(self, entity_id: str, scope: Scope) -> Admission | Refusal:
        """Take this request's cost for `entity_id`, or say how to refuse it."""
        opts = self.options
        resource = opts.resource if isinstance(opts.resource, str) else opts.resource(scope)
        pk = None if opts.partition_key is None else opts.partition_key(scope)
        deadline: dict[str, Any] = {} if opts.deadline is None else {"deadline": opts.deadline}
        acquisition = self.limiter.acquire(
            entity_id,
            resource,
            opts.limits,
            opts.amounts(scope),
            cascade=opts.cascade,
            use_stored_limits=opts.use_stored_limits,
            failure_mode=opts.failure_mode,
            **deadline,
        )
        try:
            lease = await acquisition.__aenter__()
        except RateLimitExceeded as exc:  # RequestTooLarge included
            return Refusal.exceeded(exc, entity_id, opts.units, pk, opts.too_large_status)
        except RateLimiterUnavailable:
            return Refusal.unavailable(opts.unavailable_retry_after)
        except ResourceDisabled as exc:  # an operator's kill switch, in every failure mode
            return Refusal.disabled(exc)
        except InvalidIdentifierError as exc:
            if exc.field != "entity_id":
                raise
            return Refusal.bad_key()
        except InvalidNameError as exc:
            if exc.field != "resource" or isinstance(opts.resource, str):
                raise  # a fixed resource is checked with the options: no request's doing
            return Refusal.bad_resource()
        except EntityNotFoundError:
            # The limiter remembers the miss (MISSING_ENTITY_TTL): a flood costs one read.
            return Refusal.unknown_key()
        except ValidationError as exc:
            if exc.field != "limits" or not opts.use_stored_limits:
                raise
            return Refusal.no_limits()
        own = [s for s in lease.statuses() if s.entity_id == entity_id]
        return Admission(entity_id, acquisition, lease, self._fields(own, pk))

    def _fields(self, own: list[LimitStatus], pk: bytes | None) -> list[tuple[str, str]]:
        if not own:  # a fail-open lease saw no bucket
            return []
        # The policy changes only with the limits (stored limits may differ per entity).
        limits = tuple(s.limit for s in own)
        policy = self._policies.get(limits) if pk is None else None
        if policy is None:
            policy = policy_field(own, self.options.units, pk)
            if pk is None and len(self._policies) < POLICY_CACHE_SIZE:
                self._policies[limits] = policy
        return [("ratelimit-policy", policy), ("ratelimit", ratelimit_field(own, pk))]


async def send_refusal(send: Send, refusal: Refusal) -> None:
    """Answer a request with `refusal` (its status, header fields and problem+json body)."""
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
    """Limits every HTTP request of `app` through `limiter`, by `HttpOptions` (`options=`, or
    its fields as keywords; keywords given with `options=` replace those fields).

    - `key(scope) -> str | None`: the entity id; an id the limiter rejects is answered 400.
    - `missing_key`: a request `key` gives None for is refused with 401 ("refuse", the
      default), passes unlimited ("pass"), or is keyed by a fallback key function.
    - `reconcile(served) -> {limit: real cost} | None` (may be async; the middleware's own):
      called for every charged request (`charged`: a response status below 500 was sent), also
      when the client left mid-stream or the application raised or was cancelled after its
      response started; the lease is adjusted to the real cost of each limit named.
    - `refund_on_server_error` (default True): a 5xx, or an end with no response started (the
      application raised or was cancelled first), gives the whole cost back and the hook is
      not called; the exception propagates. False: those are charged too.
    """

    def __init__(
        self,
        app: ASGIApp,
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
        reconcile: Reconcile | None = None,
        refund_on_server_error: bool | Unset = UNSET,
        tail_bytes: int = DEFAULT_TAIL_BYTES,
        partition_key: Callable[[Scope], bytes | None] | Unset | None = UNSET,
        too_large_status: int | Unset = UNSET,
        unavailable_retry_after: int | Unset = UNSET,
        options: HttpOptions | None = None,
    ) -> None:
        if reconcile is not None and not callable(reconcile):
            raise ValidationError("reconcile", reconcile, "must be a callable or None")
        if isinstance(tail_bytes, bool) or not isinstance(tail_bytes, int) or tail_bytes < 0:
            raise ValidationError("tail_bytes", tail_bytes, "must be a non-negative int")
        self.app = app
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
        self.reconcile = reconcile
        self.tail_bytes = tail_bytes if reconcile is not None else 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entity_id = key_of(self.options.key, self.options.missing_key, scope)
        if entity_id is None:
            await self.app(scope, receive, send)
            return
        if isinstance(entity_id, Refusal):
            await send_refusal(send, entity_id)
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
        except asyncio.CancelledError:
            # Cancelled (a server's graceful shutdown running out, a timeout middleware): the
            # settlement must not be cut short by a second cancellation.
            await asyncio.shield(self._end(admitted, watch, inner))
            raise
        except BaseException:
            await self._end(admitted, watch, inner)
            raise
        await self._end(admitted, watch, inner)

    async def _end(self, admitted: Admission, watch: _Watch, scope: Scope) -> None:
        """Charge or give back by `charged`; a charged request is reconciled first."""
        charge = charged(watch.status, self.options.refund_on_server_error)
        if charge:
            await self._settle(admitted.lease, watch, scope)
        await admitted.end(charge)

    async def _settle(self, lease: Lease, watch: _Watch, scope: Scope) -> None:
        """Apply the hook's real cost (errors are logged: the response is gone, and the
        estimate stands)."""
        if self.reconcile is None:
            return
        try:
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
            # No lease in the message: its repr names the entity, often a credential.
            log.exception("reconciliation of a request failed; its estimate stands")
