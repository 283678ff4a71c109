"""Every storage error the hot path can meet is an outage or a configuration error
(`zae_limiter.failures`): an outage meets the failure mode, a misconfiguration is raised as
`ConfigurationError` in every failure mode, so FAIL_OPEN never turns rate limiting off because a
key was revoked or a permission is missing."""

from __future__ import annotations

import time

import pytest
from fault_proxy import FaultProxy
from figures import Figures

from zae_limiter import (
    ConfigurationError,
    FailureMode,
    InfrastructureError,
    Limit,
    RateLimiter,
    RateLimiterUnavailable,
    StackOptions,
)
from zae_limiter.storage.dynamodb.client import RetryPolicy

pytestmark = pytest.mark.integration

TABLE = "errclass"
LIMITS = [Limit.per_minute("rpm", 100)]
# throttle_seconds=0: a throttle exhausts the retries at once (an outage, quickly).
POLICY = RetryPolicy(
    max_attempts=3, base_delay=0.001, connect_timeout=0.5, read_timeout=0.5, throttle_seconds=0
)
CODES = {"denied": "AccessDeniedException", "unrecognized": "UnrecognizedClientException"}


async def _ready(proxy: FaultProxy, mode: FailureMode) -> RateLimiter:
    limiter = RateLimiter(name=TABLE, endpoint_url=proxy.endpoint_url,
                          stack_options=StackOptions(), failure_mode=mode, retry=POLICY)
    async with limiter.acquire("k", "llm", LIMITS, {"rpm": 1}):
        pass
    limiter.clear_cache()
    return limiter


@pytest.mark.parametrize("mode", [FailureMode.FAIL_OPEN, FailureMode.FAIL_CLOSED])
@pytest.mark.parametrize("kind", sorted(CODES))
async def test_a_refusal_is_a_configuration_error_in_every_mode(
    proxy: FaultProxy, figures: Figures, kind: str, mode: FailureMode
) -> None:
    limiter = await _ready(proxy, mode)
    try:
        proxy.inject(kind)
        seen = len(proxy.requests())
        started = time.monotonic()
        with pytest.raises(ConfigurationError) as info:
            async with limiter.acquire("k", "llm", LIMITS, {"rpm": 1}):
                pytest.fail("a misconfiguration must not admit")
        assert info.value.code == CODES[kind]
        assert CODES[kind] in str(info.value)
        assert isinstance(info.value, InfrastructureError)
        assert not isinstance(info.value, RateLimiterUnavailable)
        assert len(proxy.requests()) - seen == 1  # not retried: no retry can fix it
        assert time.monotonic() - started < 1.0
        figures.add(operations=1, configuration_errors=1)
    finally:
        proxy.clear()
        await limiter.close()


@pytest.mark.parametrize("kind", sorted(CODES))
async def test_lease_operations_raise_the_configuration_error(
    proxy: FaultProxy, kind: str
) -> None:
    limiter = await _ready(proxy, FailureMode.FAIL_OPEN)
    try:
        async with limiter.acquire("k", "llm", LIMITS, {"rpm": 1}) as lease:
            proxy.inject(kind)
            with pytest.raises(ConfigurationError):
                await lease.adjust(rpm=2)
            proxy.clear()
    finally:
        proxy.clear()
        await limiter.close()


async def test_an_outage_still_meets_the_failure_mode(proxy: FaultProxy) -> None:
    limiter = await _ready(proxy, FailureMode.FAIL_OPEN)
    try:
        proxy.inject("throttle")  # throttled past the retries: an outage
        async with limiter.acquire("k", "llm", LIMITS, {"rpm": 1}) as lease:
            assert lease.fail_open
        async with limiter.acquire("k", "llm", LIMITS, {"rpm": 1},
                                   failure_mode=FailureMode.FAIL_CLOSED) as lease:
            pytest.fail("FAIL_CLOSED must not admit")
    except RateLimiterUnavailable:
        pass
    finally:
        proxy.clear()
        await limiter.close()


async def test_missing_credentials_are_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """No credentials anywhere: signing fails before anything is sent, in every mode."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", f"{tmp_path}/none")
    monkeypatch.setenv("AWS_CONFIG_FILE", f"{tmp_path}/none")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # Not a loopback endpoint: no placeholder credentials; nothing is ever sent to it.
    limiter = RateLimiter(name=TABLE, region="us-east-1",
                          endpoint_url="http://dynamodb.example.invalid",
                          failure_mode=FailureMode.FAIL_OPEN, retry=POLICY,
                          version_check="skip")
    try:
        started = time.monotonic()
        with pytest.raises(ConfigurationError) as info:
            async with limiter.acquire("k", "llm", LIMITS, {"rpm": 1}):
                pytest.fail("no credentials must not admit")
        assert info.value.code == "NoCredentialsError"
        assert time.monotonic() - started < 2.0
    finally:
        await limiter.close()
