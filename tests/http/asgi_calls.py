"""Calling an ASGI application in-process, as a server would, recording what it sends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

Message = MutableMapping[str, Any]
ASGIApp = Callable[..., Awaitable[None]]


@dataclass
class Call:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False


def http_scope(key: str | None = "k1", path: str = "/") -> dict[str, Any]:
    headers = [(b"host", b"test")]
    if key is not None:
        headers.append((b"x-api-key", key.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


async def call(
    app: ASGIApp,
    key: str | None = "k1",
    *,
    leave_after: int | None = None,
    scope: dict[str, Any] | None = None,
) -> Call:
    """One request; with `leave_after`, the client goes away after that many
    body chunks (the server then answers `receive` with `http.disconnect`)."""
    result = Call()
    gone = asyncio.Event()
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await asyncio.sleep(0)  # a server's send yields to the loop (writing, draining)
        if gone.is_set():
            return  # as uvicorn does: nothing reaches a client that left
        if message["type"] == "http.response.start":
            result.status = message["status"]
            result.raw_headers = list(message.get("headers", []))
            result.headers = {k.decode(): v.decode() for k, v in result.raw_headers}
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            if chunk:
                result.chunks.append(chunk)
                result.body += chunk
            if not message.get("more_body", False):
                result.complete = True
                gone.set()
            elif leave_after is not None and len(result.chunks) >= leave_after:
                gone.set()

    await app(scope or http_scope(key), receive, send)
    return result
