"""examples/llm_gateway as its README runs it: `python -m examples.llm_gateway`, a real process
with its own embedded DynamoDB, driven over loopback with httpx.

The gateway runs with week-long limits (key: 5 requests and 2000 tokens, project: 3000 tokens),
so nothing refills by a whole unit during the test and every count below is exact. A second
client of the table (`reader`, on the endpoint the gateway printed) checks what the gateway's
limiter wrote. What is proven:
- a completion answers 200 with the RateLimit fields (taken with the estimate) and the model's
  usage; once sent, the key's tpm reflects the real total, not the estimate;
- a streamed completion arrives as `chat.completion.chunk` events, usage, `[DONE]`, and after it
  both the key's and the project's tpm reflect its real total;
- past the key's rpm: 429, problem+json, Retry-After, exactly the limit admitted;
- two keys share the project's tpm: the second is denied once the project is spent although its
  own buckets are full, and the 429 says nothing about the project;
- bad requests (no key, bad body, unknown model) are refused before any limit is touched;
- SIGTERM stops the gateway and its embedded DynamoDB, exit code 0.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import http_sfv
import httpx
import pytest
from examples.llm_gateway.chat import ChatRequest
from examples.llm_gateway.gateway import RESOURCE
from examples.llm_gateway.provision import PROJECT

from zae_limiter import RateLimiter
from zae_limiter.http.fields import PROBLEM_JSON, QUOTA_EXCEEDED
from zae_limiter.ops.local import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WEEK = 7 * 86400
KEY_RPM, KEY_TPM, PROJECT_TPM = 5, 2000, 3000
OPTIONS = [
    "--keys", "5",
    "--key-limit", f"rpm:{KEY_RPM}/7d",
    "--key-limit", f"tpm:{KEY_TPM}/7d",
    "--project-limit", f"tpm:{PROJECT_TPM}/7d",
    "--token-delay", "0",
    "--log-level", "warning",
]  # fmt: skip
STARTUP_SECONDS = 30.0
DYNAMODB_LINE = "Embedded DynamoDB: "
COMPLETIONS = "/v1/chat/completions"


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    url: str
    dynamodb_url: str

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode()


def _start(log: IO[bytes]) -> Gateway:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.llm_gateway", "--port", str(port), *OPTIONS],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    gateway = Gateway(process, log, f"http://127.0.0.1:{port}", "")
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited: {gateway.output()}")
        try:
            if httpx.get(f"{gateway.url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    else:
        raise RuntimeError(f"the gateway did not answer in time: {gateway.output()}")
    # The banner is printed before the server starts, so it is complete by now.
    line = next(ln for ln in gateway.output().splitlines() if ln.startswith(DYNAMODB_LINE))
    gateway.dynamodb_url = line.removeprefix(DYNAMODB_LINE).split()[0]
    return gateway


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    with tempfile.TemporaryFile() as log:
        gateway = _start(log)
        try:
            yield gateway
        finally:
            if gateway.process.poll() is None:
                gateway.process.terminate()
                try:
                    gateway.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    gateway.process.kill()
                    gateway.process.wait(timeout=5)


@pytest.fixture
async def reader(gateway: Gateway) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(name="llm-gateway", endpoint_url=gateway.dynamodb_url) as limiter:
        yield limiter


def chat(content: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"model": "sim-1", "messages": messages, "max_tokens": max_tokens, **extra}


def estimate(body: Mapping[str, Any]) -> int:
    return ChatRequest.parse(json.dumps(body).encode()).estimate


def bearer(n: int) -> dict[str, str]:
    return {"authorization": f"Bearer sk-demo-{n}"}


def parse_list(value: str) -> dict[str, dict[str, object]]:
    """An RFC 9651 List of Items whose values are Strings, by value: their parameters."""
    parsed = http_sfv.List()
    parsed.parse(value.encode())
    return {str(item.value): dict(item.params) for item in parsed}


async def available(reader: RateLimiter, entity_id: str) -> dict[str, int]:
    return await reader.available(entity_id, RESOURCE, None, use_stored_limits=True)


async def until_available(
    reader: RateLimiter, entity_id: str, expected: Mapping[str, int], timeout: float = 10.0
) -> dict[str, int]:
    """What `available()` says once it equals `expected` (a reconciliation lands after the
    response), or when `timeout` passed."""
    deadline = time.monotonic() + timeout
    while True:
        seen = await available(reader, entity_id)
        if seen == expected or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.1)


async def settled(reader: RateLimiter, entity_id: str) -> dict[str, int]:
    """`available()` once two reads 0.3 s apart agree: an earlier test's reconciliation of the
    shared project may still be landing."""
    seen = await available(reader, entity_id)
    while True:
        await asyncio.sleep(0.3)
        again = await available(reader, entity_id)
        if again == seen:
            return seen
        seen = again


async def test_completion_has_fields_and_is_reconciled_with_its_usage(
    gateway: Gateway, reader: RateLimiter
) -> None:
    body = chat("Tell me about rate limits", 50)
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        response = await client.post(COMPLETIONS, json=body, headers=bearer(1))
    assert response.status_code == 200
    completion = response.json()
    assert completion["object"] == "chat.completion"
    usage = completion["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    words = completion["choices"][0]["message"]["content"].split()
    assert len(words) == usage["completion_tokens"] > 0
    assert usage["total_tokens"] != estimate(body)
    # The key's own limits only (the project also has a tpm: 3000, not shown).
    assert parse_list(response.headers["ratelimit-policy"]) == {
        "rpm": {"q": KEY_RPM, "w": WEEK},
        "tpm": {"q": KEY_TPM, "qu": "tokens", "w": WEEK},
    }
    # Sent before the model ran: they show the estimate taken.
    current = parse_list(response.headers["ratelimit"])
    assert current["rpm"]["r"] == KEY_RPM - 1
    assert current["tpm"]["r"] == KEY_TPM - estimate(body)
    expected = {"rpm": KEY_RPM - 1, "tpm": KEY_TPM - usage["total_tokens"]}
    assert await until_available(reader, "key-1", expected) == expected


async def test_stream_is_reconciled_for_the_key_and_the_project(
    gateway: Gateway, reader: RateLimiter
) -> None:
    project_before = (await settled(reader, PROJECT))["tpm"]
    body = chat("Stream me a short answer", 30, stream=True, stream_options={"include_usage": True})
    events: list[str] = []
    async with (
        httpx.AsyncClient(base_url=gateway.url) as client,
        client.stream("POST", COMPLETIONS, json=body, headers=bearer(2)) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["transfer-encoding"] == "chunked"  # sent as it is generated
        assert parse_list(response.headers["ratelimit"])["tpm"]["r"] == KEY_TPM - estimate(body)
        async for line in response.aiter_lines():
            if line:
                assert line.startswith("data: ")
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks[:-1]]
    assert sum(1 for d in deltas if d) == usage["completion_tokens"] > 1
    total = usage["total_tokens"]
    assert total != estimate(body)
    expected = {"rpm": KEY_RPM - 1, "tpm": KEY_TPM - total}
    assert await until_available(reader, "key-2", expected) == expected
    project = {"tpm": project_before - total}
    assert await until_available(reader, PROJECT, project) == project


async def test_past_the_keys_rpm_is_429_problem_json(gateway: Gateway, reader: RateLimiter) -> None:
    n = KEY_RPM + 3
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        responses = await asyncio.gather(
            *(client.post(COMPLETIONS, json=chat("hi", 1), headers=bearer(3)) for _ in range(n))
        )
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == KEY_RPM and statuses.count(429) == n - KEY_RPM
    for denied in (r for r in responses if r.status_code == 429):
        assert denied.headers["content-type"] == PROBLEM_JSON
        wait = int(denied.headers["retry-after"])
        current = parse_list(denied.headers["ratelimit"])["rpm"]
        assert current["r"] == 0 and 1 <= int(str(current["t"])) <= wait
        problem = denied.json()
        assert problem["type"] == QUOTA_EXCEEDED and problem["status"] == 429
        assert problem["violated-policies"] == ["rpm"]
    assert (await settled(reader, "key-3"))["rpm"] == 0


async def test_the_project_tpm_shared_by_two_keys_denies_the_second(
    gateway: Gateway, reader: RateLimiter
) -> None:
    project = (await settled(reader, PROJECT))["tpm"]
    # Within key 4's own 2000 tokens, and enough to leave the project less than key 5 may ask.
    big = chat(" ".join(["budget"] * 300), 1000)
    assert estimate(big) <= min(KEY_TPM, project)
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        first = await client.post(COMPLETIONS, json=big, headers=bearer(4))
        assert first.status_code == 200
        used = first.json()["usage"]["total_tokens"]
        left = {"tpm": project - used}
        assert await until_available(reader, PROJECT, left) == left
        # Key 5 asks one token more than the project has left: well within its own tpm.
        base = estimate(chat("Hi", 1)) - 1
        ask = chat("Hi", left["tpm"] + 1 - base)
        assert estimate(ask) == left["tpm"] + 1 <= KEY_TPM
        denied = await client.post(COMPLETIONS, json=ask, headers=bearer(5))
    assert denied.status_code == 429
    assert denied.headers["content-type"] == PROBLEM_JSON
    assert int(denied.headers["retry-after"]) >= 1
    # Its own buckets are full, and say so; the project appears nowhere.
    current = parse_list(denied.headers["ratelimit"])
    assert {name: params["r"] for name, params in current.items()} == {
        "rpm": KEY_RPM,
        "tpm": KEY_TPM,
    }
    problem = denied.json()
    assert problem["violated-policies"] == []
    shared = [lim for lim in problem["limits"] if lim.get("shared")]
    assert [(lim["limit_name"], lim["exceeded"]) for lim in shared] == [("tpm", True)]
    # No id, capacity or remaining tokens of the project.
    assert all(
        set(lim) == {"limit_name", "shared", "exceeded", "retry_after_seconds"} for lim in shared
    )
    assert PROJECT not in denied.text + json.dumps(dict(denied.headers))
    assert await available(reader, "key-5") == {"rpm": KEY_RPM, "tpm": KEY_TPM}


async def test_bad_requests_are_refused_before_any_limit(
    gateway: Gateway, reader: RateLimiter
) -> None:
    ok = chat("hi", 1)
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        anonymous = await client.post(COMPLETIONS, json=ok)
        unknown = await client.post(COMPLETIONS, json=ok, headers={"authorization": "Bearer x"})
        no_messages = await client.post(COMPLETIONS, json={"model": "sim-1"}, headers=bearer(5))
        bad_model = await client.post(COMPLETIONS, json={**ok, "model": "gpt"}, headers=bearer(5))
    for response in (anonymous, unknown):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
    assert no_messages.status_code == 400 and no_messages.json()["param"] == "messages"
    assert bad_model.status_code == 404 and bad_model.json()["param"] == "model"
    for response in (anonymous, unknown, no_messages, bad_model):
        assert response.headers["content-type"] == PROBLEM_JSON
        assert "ratelimit" not in response.headers
    assert (await available(reader, "key-5"))["rpm"] == KEY_RPM


def test_sigterm_stops_the_gateway_and_its_dynamodb(gateway: Gateway) -> None:
    """Last: it ends the module's gateway."""
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(timeout=15) == 0
    assert "Stopped the gateway and its embedded DynamoDB." in gateway.output()
    for url in (f"{gateway.url}/health", f"{gateway.dynamodb_url}/moto-api/"):
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)
