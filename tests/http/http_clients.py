"""A client process of the uvicorn tests: `python http_clients.py URL KEY N START_AT`.

Waits until the wall clock reaches START_AT (so that several processes fire together), sends N
concurrent GETs with the API key, and prints one JSON line per response: status, Retry-After,
content type.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx


async def main(url: str, key: str, n: int, start_at: float) -> None:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        responses = await asyncio.gather(
            *(client.get(url, headers={"x-api-key": key}) for _ in range(n))
        )
    for r in responses:
        print(
            json.dumps(
                {
                    "status": r.status_code,
                    "retry_after": r.headers.get("retry-after"),
                    "content_type": r.headers.get("content-type"),
                    "ratelimit": r.headers.get("ratelimit"),
                }
            )
        )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
