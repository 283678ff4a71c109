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

A second gateway (`plans`, `PLAN_OPTIONS`) runs the plan of quotas, caps and tiers: per key a
monthly token quota and a cap of 2 streams, a project cap of 3 streams, two trial keys whose
tpm is soft, and a model slow enough (0.1 s a token) for streams to be held while others ask.
What is proven there:
- a key's monthly quota is debited with the real usage and, once too little is left, denies
  with a retry-after that ends at the start of the next month (UTC);
- a key's third concurrent stream is refused while two stream, a non-streaming request is
  not; the project's cap refuses a second key once the keys together hold 3; a slot comes back
  when a stream ends and when its client disconnects;
- a trial key's soft tpm admits traffic past its allowance (measured: the bucket is in debt),
  where a standard key with the same traffic is refused;
- the limits it is given are checked, and the banner shows each tier's.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import http_sfv
import httpx
import pytest
from examples.llm_gateway.chat import ChatRequest
from examples.llm_gateway.gateway import RESOURCE
from examples.llm_gateway.provision import PROJECT, check_limits

from zae_limiter import Limit, RateLimiter, ValidationError
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
QUOTA, PLAN_TPM, KEY_STREAMS, PROJECT_STREAMS = 3000, 1000, 2, 3
TOKEN_DELAY = 0.1
PLAN_OPTIONS = [
    "--keys", "5",
    "--trial-keys", "2",
    "--key-limit", "rpm:50/7d",
    "--key-limit", f"tpm:{PLAN_TPM}/7d",
    "--key-limit", f"tokens-month:{QUOTA}/quota,cron=0 0 1 * *",
    "--key-limit", f"streams:{KEY_STREAMS}/concurrent,lease_ttl=60s",
    "--project-limit", "tpm:100000/7d",
    "--project-limit", f"streams:{PROJECT_STREAMS}/concurrent,lease_ttl=60s",
    "--token-delay", str(TOKEN_DELAY),
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


def _start(log: IO[bytes], options: list[str]) -> Gateway:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.llm_gateway", "--port", str(port), *options],
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


def _serve(options: list[str]) -> Iterator[Gateway]:
    with tempfile.TemporaryFile() as log:
        gateway = _start(log, options)
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


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    yield from _serve(OPTIONS)


@pytest.fixture(scope="module")
def plans() -> Iterator[Gateway]:
    yield from _serve(PLAN_OPTIONS)


@pytest.fixture
async def reader(gateway: Gateway) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(name="llm-gateway", endpoint_url=gateway.dynamodb_url) as limiter:
        yield limiter


@pytest.fixture
async def plan_reader(plans: Gateway) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(name="llm-gateway", endpoint_url=plans.dynamodb_url) as limiter:
        yield limiter


def chat(content: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"model": "sim-1", "messages": messages, "max_tokens": max_tokens, **extra}


def estimate(body: Mapping[str, Any]) -> int:
    return ChatRequest.parse(json.dumps(body).encode()).estimate


def bearer(n: int) -> dict[str, str]:
    return {"authorization": f"Bearer sk-demo-{n}"}


def trial_bearer(n: int) -> dict[str, str]:
    return {"authorization": f"Bearer sk-trial-{n}"}


def words(n: int) -> str:
    """A prompt of `n` words: tokens the model takes no time for (only answers are slow)."""
    return " ".join(["budget"] * n)


def next_month(now: float) -> float:
    """When the month after `now` starts (UTC), as a Unix time."""
    day = datetime.fromtimestamp(now, UTC)
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


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


async def until_limit(
    reader: RateLimiter, entity_id: str, name: str, expected: int, timeout: float = 10.0
) -> int:
    """`available()` of one limit once it equals `expected`, or when `timeout` passed."""
    deadline = time.monotonic() + timeout
    while True:
        seen = (await available(reader, entity_id))[name]
        if seen == expected or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.05)


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


async def test_a_keys_monthly_quota_denies_until_the_next_month(
    plans: Gateway, plan_reader: RateLimiter
) -> None:
    # A trial key: its tpm (soft) refuses nothing, so the quota is the first limit its tokens
    # run into; a standard key's hard tpm, a third of the quota, would refuse first.
    body = chat(words(1000), 1)
    assert PLAN_TPM < estimate(body) <= QUOTA
    async with httpx.AsyncClient(base_url=plans.url) as client:
        first = await client.post(COMPLETIONS, json=body, headers=trial_bearer(2))
        assert first.status_code == 200
        used = first.json()["usage"]["total_tokens"]
        assert used != estimate(body)
        # Reconciled like tpm: the quota keeps the real usage, not the estimate.
        left = QUOTA - used
        assert await until_limit(plan_reader, "trial-2", "tokens-month", left) == left
        # One token more than is left, well within the whole quota (not a 413).
        base = estimate(chat("Hi", 1)) - 1
        ask = chat("Hi", left + 1 - base)
        assert estimate(ask) == left + 1 <= QUOTA
        before = time.time()
        denied = await client.post(COMPLETIONS, json=ask, headers=trial_bearer(2))
        after = time.time()
        fits = await client.post(COMPLETIONS, json=chat("Hi", 1), headers=trial_bearer(2))
    assert denied.status_code == 429
    problem = denied.json()
    assert problem["violated-policies"] == ["tokens-month"]
    reset = next_month(before)
    assert next_month(after) == reset, "the month turned during the test"
    wait = problem["retry_after_seconds"]
    # A millisecond either side: the problem's seconds are rounded to ms.
    assert reset - after - 0.001 <= wait <= reset - before + 0.001
    assert (
        math.floor(reset - after) <= int(denied.headers["retry-after"]) <= math.ceil(reset - before)
    )
    quota = parse_list(denied.headers["ratelimit"])["tokens-month"]
    assert quota["r"] == left
    assert math.floor(reset - after) <= int(str(quota["t"])) <= math.ceil(reset - before)
    # Refused for its size only: what is left still admits a request that fits.
    assert fits.status_code == 200


async def test_a_third_stream_and_a_full_project_are_refused_until_a_slot_comes_back(
    plans: Gateway, plan_reader: RateLimiter
) -> None:
    # Answers of 120 tokens (12 s, unless their client leaves) and one of 40 (4 s); the prompt
    # is long enough for the model to write that many.
    long, short = (
        chat(words(40), n, stream=True, stream_options={"include_usage": True}) for n in (120, 40)
    )
    short_seconds = 40 * TOKEN_DELAY
    async with httpx.AsyncClient(base_url=plans.url, timeout=30) as client:
        held: list[httpx.Response] = []

        async def open_stream(body: dict[str, Any], key: int) -> httpx.Response:
            """The response once its head is in: a stream still running, or a refusal read."""
            request = client.build_request("POST", COMPLETIONS, json=body, headers=bearer(key))
            response = await client.send(request, stream=True)
            held.append(response)
            if response.status_code != 200:
                await response.aread()
            return response

        try:
            s1 = await open_stream(long, 1)
            started = time.monotonic()
            s2 = await open_stream(short, 1)
            assert (s1.status_code, s2.status_code) == (200, 200)
            third = await open_stream(long, 1)
            plain = await client.post(COMPLETIONS, json=chat("hi", 1), headers=bearer(1))
            s4 = await open_stream(long, 2)
            over_project = await open_stream(long, 2)
            assert time.monotonic() - started < short_seconds, "the short stream ended already"

            # Key 1's cap: both its slots held, the project has one left.
            assert third.status_code == 429
            problem = third.json()
            assert problem["violated-policies"] == ["streams"]
            assert not [lim for lim in problem["limits"] if lim.get("shared")]
            assert int(third.headers["retry-after"]) == 1
            assert 0 < problem["retry_after_seconds"] <= 1
            # Not a stream: it takes no slot, so two streams do not hold it back.
            assert plain.status_code == 200
            # The project's cap: 3 held across the keys; key 2 holds only one of its own 2.
            assert s4.status_code == 200
            assert over_project.status_code == 429
            problem = over_project.json()
            assert problem["violated-policies"] == []
            assert [(lim["limit_name"], lim["exceeded"]) for lim in problem["limits"]] == [
                ("streams", True)
            ]
            assert int(over_project.headers["retry-after"]) == 1
            assert "ratelimit" not in over_project.headers  # key 2's own cap was not refused

            # A stream that ends gives its slot back, to the key and to the project.
            chunks = [line async for line in s2.aiter_lines() if line]
            assert chunks[-1] == "data: [DONE]"
            assert await until_limit(plan_reader, "key-1", "streams", 1) == 1
            s3 = await open_stream(long, 1)
            assert s3.status_code == 200

            # A client that leaves mid-stream gives its slot back too, long before its stream
            # would have ended (seconds from now): key 2 gets it.
            await s1.aclose()
            assert await until_limit(plan_reader, PROJECT, "streams", 1, timeout=2.0) == 1
            s5 = await open_stream(long, 2)
            assert s5.status_code == 200
        finally:
            for response in held:
                await response.aclose()
    for entity_id in ("key-1", "key-2"):
        assert await until_limit(plan_reader, entity_id, "streams", KEY_STREAMS) == KEY_STREAMS
    assert await until_limit(plan_reader, PROJECT, "streams", PROJECT_STREAMS) == PROJECT_STREAMS


async def test_a_trial_keys_soft_tpm_admits_what_a_standard_key_is_refused(
    plans: Gateway, plan_reader: RateLimiter
) -> None:
    body = chat(words(400), 1)
    big = chat(words(600), 1)  # above the tpm's burst by itself
    assert 3 * estimate(body) > PLAN_TPM and estimate(big) > PLAN_TPM
    async with httpx.AsyncClient(base_url=plans.url) as client:
        trial = [
            await client.post(COMPLETIONS, json=b, headers=trial_bearer(1))
            for b in (body, body, body, big)
        ]
        standard = [
            await client.post(COMPLETIONS, json=b, headers=bearer(3))
            for b in (body, body, body, big)
        ]
    assert [r.status_code for r in trial] == [200, 200, 200, 200]
    assert [r.status_code for r in standard] == [200, 429, 429, 413]
    assert all(r.json()["violated-policies"] == ["tpm"] for r in standard[1:3])
    # Measured all the same: the trial key's tpm is in debt by what it used past its allowance,
    # and its RateLimit field says nothing is left.
    used = sum(r.json()["usage"]["total_tokens"] for r in trial)
    assert used > PLAN_TPM
    assert parse_list(trial[-1].headers["ratelimit"])["tpm"]["r"] == 0
    assert await until_limit(plan_reader, "trial-1", "tpm", PLAN_TPM - used) == PLAN_TPM - used
    # The quota is charged on both tiers, with the real usage.
    assert await until_limit(plan_reader, "trial-1", "tokens-month", QUOTA - used) == QUOTA - used
    first = standard[0].json()["usage"]["total_tokens"]
    assert await until_limit(plan_reader, "key-3", "tokens-month", QUOTA - first) == QUOTA - first


async def test_a_full_project_cap_is_shown_to_a_key_as_shared_only(plans: Gateway) -> None:
    long = chat(words(40), 120, stream=True)
    async with httpx.AsyncClient(base_url=plans.url, timeout=30) as client:
        held: list[httpx.Response] = []
        try:
            for key in (4, 4, 5, 5):
                request = client.build_request("POST", COMPLETIONS, json=long, headers=bearer(key))
                held.append(await client.send(request, stream=True))
            denied = held[-1]
            await denied.aread()
        finally:
            for response in held:
                await response.aclose()
    assert [r.status_code for r in held] == [200, 200, 200, 429]
    shared = [lim for lim in denied.json()["limits"] if lim.get("shared")]
    assert [(lim["limit_name"], lim["exceeded"]) for lim in shared] == [("streams", True)]
    # As for the project's tpm: no capacity or free slots of the project.
    assert all(
        set(lim) == {"limit_name", "shared", "exceeded", "retry_after_seconds"}
        for lim in denied.json()["limits"]
    )


def test_the_plan_is_checked_and_shown(plans: Gateway) -> None:
    key = [Limit.parse(s) for s in ("rpm:1/minute", "tpm:1/minute", "streams:1/concurrent")]
    check_limits(key, [Limit.parse("streams:2/concurrent")])
    # A project cap the keys lack would take a slot of every request: no cost names it.
    with pytest.raises(ValidationError):
        check_limits(key[:2], [Limit.parse("streams:2/concurrent")])
    # Same name, another kind: a project bucket `streams` would count a key's slots as units.
    with pytest.raises(ValidationError):
        check_limits(key, [Limit.parse("streams:2/minute")])
    # A third bucket: no cost for it.
    with pytest.raises(ValidationError):
        check_limits([*key, Limit.parse("rpd:5/day")], [key[1]])
    with pytest.raises(ValidationError):
        check_limits(key[1:], [key[1]])
    banner = plans.output()
    assert "Project demo-project: tpm:100000/604800s; streams:3/concurrent,lease_ttl=60s" in banner
    assert (
        "API keys (each: rpm:50/604800s; tpm:1000/604800s; "
        "tokens-month:3000/quota,cron=0 0 1 * *,tz=UTC; streams:2/concurrent,lease_ttl=60s):"
    ) in banner
    assert "; tpm:1000/604800s,soft; " in banner
    for line in ("sk-demo-5 -> entity key-5", "sk-trial-2 -> entity trial-2"):
        assert f"  {line}\n" in banner


def test_sigterm_stops_the_gateway_and_its_dynamodb(gateway: Gateway) -> None:
    """Last: it ends the module's gateway."""
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(timeout=15) == 0
    assert "Stopped the gateway and its embedded DynamoDB." in gateway.output()
    for url in (f"{gateway.url}/health", f"{gateway.dynamodb_url}/moto-api/"):
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)
