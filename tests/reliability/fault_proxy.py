"""A fault-injecting HTTP proxy for DynamoDB on loopback (asyncio, in its own thread).

The proxy understands just enough HTTP/1.1 to see request boundaries and each request's
`X-Amz-Target` (e.g. `DynamoDB_20120810.UpdateItem`), so a fault can target one operation:

- ``refuse``   connection level: the listening socket is closed (the kernel refuses new
               connections) and open client connections are reset; `clear()` listens again.
- ``hang``     read the request, never answer, never forward (the client's read timeout fires).
- ``cut``      forward the request (DynamoDB APPLIES it), send half of the response, then close.
- ``reset``    forward the request (DynamoDB APPLIES it), then abort with a TCP RST, no answer.
- ``delay``    wait ``delay`` seconds, then forward (after a client timeout, the write still lands).
- ``throttle`` HTTP 400 ProvisionedThroughputExceededException (not forwarded).
- ``error500`` HTTP 500 InternalServerError (not forwarded).
- ``error503`` HTTP 503 ServiceUnavailable (not forwarded; a real 503 gives no such promise).
- ``denied``   HTTP 400 AccessDeniedException (a missing permission; not forwarded).
- ``unrecognized`` HTTP 400 UnrecognizedClientException (a revoked or unknown key; not forwarded).

Faults are armed with `inject(kind, ops=..., count=N | None, probability=p, match=b"...")`: the
next N matching requests (or every one, while armed) with probability p, optionally only those
whose body contains `match` (e.g. one entity's key). Every request is recorded with the
fault it received, so tests can count attempts and check retry spacing.

A *write ceiling* (`ceiling(writes_per_second, window=1.0)`) models DynamoDB's per-partition
write limit, scaled down: per item (table and key, read from the JSON body of `UpdateItem`,
`PutItem` and `DeleteItem`), at most `writes_per_second * window` writes are forwarded within any
sliding `window` seconds; a write above it gets the ``throttle`` answer (not forwarded), recorded
as fault ``ceiling`` and counted in `stats.injected["ceiling"]`. Only forwarded writes count
against it, so a client that retries throttled writes is admitted as soon as the window allows.
Armed faults act on the writes the ceiling lets through; `clear()` removes the ceiling too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

KINDS = (
    "refuse",
    "hang",
    "cut",
    "reset",
    "delay",
    "throttle",
    "error500",
    "error503",
    "denied",
    "unrecognized",
)
WRITE_OPS = frozenset(
    {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"}
)

_THROTTLE = (
    400,
    "Bad Request",
    "ProvisionedThroughputExceededException",
    "The level of configured provisioned throughput for the table was exceeded. "
    "Consider increasing your provisioning level with the UpdateTable API.",
)
_ERROR500 = (500, "Internal Server Error", "InternalServerError", "Internal server error")
# Answers of a misconfigured client (a missing permission, a revoked or unknown key).
_REFUSALS = {
    "throttle": _THROTTLE,
    "error500": _ERROR500,
    "error503": (503, "Service Unavailable", "ServiceUnavailable", "Service unavailable"),
    "denied": (
        400,
        "Bad Request",
        "AccessDeniedException",
        "User: arn:aws:iam::123456789012:user/app is not authorized to perform: "
        "dynamodb:UpdateItem on resource: arn:aws:dynamodb:us-east-1:123456789012:table/x",
    ),
    "unrecognized": (
        400,
        "Bad Request",
        "UnrecognizedClientException",
        "The security token included in the request is invalid.",
    ),
}
# Single-item writes: the ones the write ceiling counts per item.
ITEM_WRITE_OPS = frozenset({"PutItem", "UpdateItem", "DeleteItem"})
CEILING = "ceiling"

ItemKey = tuple[str, str, str]  # (TableName, PK, SK)


def item_key(body: bytes) -> ItemKey | None:
    """(TableName, PK, SK) of a single-item request's JSON body (the `Key`, or a PutItem's
    `Item`); None if the body does not name one."""
    try:
        request = json.loads(body)
    except ValueError:
        return None
    if not isinstance(request, dict):
        return None
    key = request.get("Key") or request.get("Item")
    if not isinstance(key, dict):
        return None
    parts: list[str] = []
    for attr in ("PK", "SK"):  # zae_limiter.schema.PK / SK
        value = key.get(attr)
        parts.append(next(iter(value.values()), "") if isinstance(value, dict) and value else "")
    return str(request.get("TableName", "")), str(parts[0]), str(parts[1])


@dataclass
class Fault:
    kind: str
    ops: frozenset[str] | None = None
    remaining: int | None = None
    probability: float = 1.0
    delay: float = 0.0
    match: bytes | None = None  # only requests whose body contains these bytes

    def matches(self, op: str, body: bytes) -> bool:
        return (self.ops is None or op in self.ops) and (
            self.match is None or self.match in body
        )


@dataclass
class Seen:
    """One request as the proxy saw it (and, if forwarded, DynamoDB's HTTP status)."""

    at: float  # time.monotonic()
    op: str
    fault: str | None
    body: bytes = b""
    status: int | None = None  # set when DynamoDB answered (whatever the client got)
    response: bytes = b""  # DynamoDB's whole answer (whatever the client got)
    answered: float | None = None  # time.monotonic() when DynamoDB answered
    item: ItemKey | None = None  # (TableName, PK, SK) of a single-item write, else None


@dataclass
class ProxyStats:
    seen: list[Seen] = field(default_factory=list)
    injected: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    # Per item, under a write ceiling: writes forwarded / throttled by the ceiling.
    item_forwarded: Counter[ItemKey] = field(default_factory=Counter)
    item_throttled: Counter[ItemKey] = field(default_factory=Counter)


@dataclass
class Ceiling:
    """At most `limit` forwarded writes per item within any sliding `window` seconds."""

    limit: int
    window: float
    forwarded: dict[ItemKey, deque[float]] = field(default_factory=dict)

    def admit(self, key: ItemKey, now: float) -> bool:
        times = self.forwarded.setdefault(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            return False
        times.append(now)
        return True


class FaultProxy:
    """`with FaultProxy(upstream_port) as proxy:` then point clients at `proxy.endpoint_url`."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", seed: int = 7):
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._ceiling: Ceiling | None = None
        self.stats = ProxyStats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._refusing = False

    # -- lifecycle (called from the test's thread) ---------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._run(self._listen())
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._shutdown(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, coro: object, timeout: float = 30) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    # -- control --------------------------------------------------------------------------

    def inject(
        self,
        kind: str,
        *,
        ops: set[str] | frozenset[str] | None = None,
        count: int | None = None,
        probability: float = 1.0,
        delay: float = 0.0,
        match: bytes | None = None,
    ) -> None:
        """Arm a fault for the next `count` matching requests (None: until `clear()`)."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        if kind == "refuse":
            if ops is not None or count is not None:
                raise ValueError("refuse acts on connections: no ops or count")
            self._run(self._refuse())
            return
        with self._lock:
            self._faults.append(
                Fault(
                    kind, None if ops is None else frozenset(ops), count, probability, delay, match
                )
            )

    def ceiling(self, writes_per_second: float | None, window: float = 1.0) -> None:
        """Forward at most `writes_per_second * window` (rounded down, at least 1) single-item
        writes per item within any sliding `window` seconds; throttle the others. None removes
        the ceiling. Arming it again starts with empty windows."""
        if writes_per_second is None:
            with self._lock:
                self._ceiling = None
            return
        if writes_per_second <= 0 or window <= 0:
            raise ValueError("writes_per_second and window must be positive")
        limit = max(1, int(writes_per_second * window + 1e-9))
        with self._lock:
            self._ceiling = Ceiling(limit, window)

    def clear(self) -> None:
        """Disarm every fault and the write ceiling (and listen again after `refuse`)."""
        with self._lock:
            self._faults.clear()
            self._ceiling = None
        if self._refusing:
            self._run(self._listen())

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = ProxyStats()

    def requests(self, op: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.stats.seen if op is None or s.op == op]

    def writes(self) -> list[Seen]:
        with self._lock:
            return [s for s in self.stats.seen if s.op in WRITE_OPS]

    def _over_ceiling(self, op: str, key: ItemKey | None, now: float) -> bool:
        """True when the write ceiling refuses this request (a single-item write over it)."""
        with self._lock:
            ceiling = self._ceiling
            if ceiling is None or key is None or op not in ITEM_WRITE_OPS:
                return False
            if ceiling.admit(key, now):
                return False
            self.stats.injected[CEILING] += 1
            self.stats.item_throttled[key] += 1
            return True

    def _unadmit(self, key: ItemKey | None, at: float) -> None:
        """A write the ceiling let through was not forwarded after all (an armed fault
        answered it): it does not count against the ceiling."""
        with self._lock:
            ceiling = self._ceiling
            if ceiling is None or key is None:
                return
            times = ceiling.forwarded.get(key)
            if times is not None:
                with contextlib.suppress(ValueError):
                    times.remove(at)

    def item_writes(self, key: ItemKey) -> tuple[int, int]:
        """(forwarded, throttled by the ceiling) single-item writes to `key` since the last
        `reset_stats()`."""
        with self._lock:
            return self.stats.item_forwarded[key], self.stats.item_throttled[key]

    def max_forwarded_in_window(
        self, key: ItemKey, window: float = 1.0, since: float | None = None
    ) -> int:
        """The most writes to `key` forwarded within any `window` seconds (from the records;
        only those at or after `since`, a `time.monotonic()`)."""
        times = sorted(
            s.at
            for s in self.requests()
            if s.item == key and s.status is not None and (since is None or s.at >= since)
        )
        best = start = 0
        for end, at in enumerate(times):
            while times[start] <= at - window:
                start += 1
            best = max(best, end - start + 1)
        return best

    def _pick(self, op: str, body: bytes) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if not fault.matches(op, body):
                    continue
                if fault.remaining is not None and fault.remaining <= 0:
                    continue
                if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                self.stats.injected[fault.kind] += 1
                return fault
        return None

    # -- the proxy loop ---------------------------------------------------------------------

    async def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._handle, sock=sock)
        self._refusing = False

    async def _refuse(self) -> None:
        self._refusing = True
        with self._lock:
            self.stats.injected["refuse"] += 1
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            _abort(writer)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def _shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            _abort(writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with self._lock:
            self.stats.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return
                headers = _headers(head)
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                op = headers.get("x-amz-target", "").rpartition(".")[2]
                key = item_key(body) if op in ITEM_WRITE_OPS else None
                now = time.monotonic()
                if self._over_ceiling(op, key, now):
                    with self._lock:
                        self.stats.seen.append(Seen(now, op, CEILING, body, item=key))
                    writer.write(_error_response(*_THROTTLE))
                    await writer.drain()
                    continue
                fault = self._pick(op, body)
                seen = Seen(now, op, fault.kind if fault else None, body, item=key)
                with self._lock:
                    self.stats.seen.append(seen)
                kind = fault.kind if fault else None
                if kind == "hang" or kind in _REFUSALS:
                    self._unadmit(key, now)  # not forwarded: not a write to the item
                elif key is not None:
                    with self._lock:
                        self.stats.item_forwarded[key] += 1
                if kind == "hang":
                    # Never answer; wait (bounded) for the client to give up and close.
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(reader.read(), 60)
                    return
                if kind in _REFUSALS:
                    writer.write(_error_response(*_REFUSALS[kind]))
                    await writer.drain()
                    continue
                if kind == "delay" and fault is not None:
                    await asyncio.sleep(fault.delay)
                response, keep_alive = await self._forward(head, body)
                seen.answered = time.monotonic()
                seen.status = int(response.split(b" ", 2)[1])
                seen.response = response
                if kind == "reset":
                    _abort(writer)
                    return
                if kind == "cut":
                    writer.write(response[: len(response) // 2])
                    await writer.drain()
                    writer.close()
                    return
                writer.write(response)
                await writer.drain()
                if not keep_alive:
                    writer.close()
                    return
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _forward(self, head: bytes, body: bytes) -> tuple[bytes, bool]:
        """Send one request upstream on a fresh connection; the whole response, and whether the
        client connection may be kept alive (the response is framed)."""
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            up_writer.write(_set_connection(head, "close") + body)
            await up_writer.drain()
            response = await asyncio.wait_for(up_reader.read(), 60)
        finally:
            up_writer.close()
        resp_head, sep, resp_body = response.partition(b"\r\n\r\n")
        resp_headers = _headers(resp_head + sep)
        framed = "content-length" in resp_headers or "chunked" in resp_headers.get(
            "transfer-encoding", ""
        )
        if framed:
            response = _set_connection(resp_head + sep, "keep-alive") + resp_body
        return response, framed


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    result: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if colon:
            result[name.strip().lower()] = value.strip()
    return result


def _set_connection(head: bytes, value: str) -> bytes:
    lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    kept = [lines[0]] + [ln for ln in lines[1:] if not ln.lower().startswith("connection:")]
    kept.append(f"Connection: {value}")
    return ("\r\n".join(kept) + "\r\n\r\n").encode("latin-1")


def _error_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps(
        {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": message}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/x-amz-json-1.0\r\n"
        f"x-amzn-ErrorType: {code}\r\n"
        "x-amzn-RequestId: FAULTPROXY0000000000000000000000000000000000000000000\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(Exception):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
