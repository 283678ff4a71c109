"""OpenTelemetry metrics, read back through the SDK's in-memory reader.

The `Metrics` class alone (outcomes, denials, latency, attributes, cardinality, the no-op without
OpenTelemetry); limiters on `MemoryStorage` (the storage contract shows it behaves as DynamoDB
does): acquire outcomes through `acquire`, conflicts between two limiters, the sync twin passing
its metrics on; then on moto's server what is the DynamoDB repository's own: its calls and
capacity units exported equal its ledger's, retries under injected throttling, unconfirmed
give-backs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from reliability.fault_proxy import FaultProxy
from zae_limiter import (
    FailureMode,
    Limit,
    MemoryStorage,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    StackOptions,
    SyncRateLimiter,
    ValidationError,
)
from zae_limiter.metrics import (
    ADMITTED,
    DEFAULT_MAX_SERIES,
    DENIED,
    ENTITY_ID,
    FAIL_OPEN,
    LIMIT,
    NO_METRICS,
    OPERATION,
    OVERFLOW_ATTRIBUTE,
    RESOURCE,
    RESULT,
    RESULTS,
    UNAVAILABLE,
    Metrics,
)
from zae_limiter.ops.local import LocalDynamoDB, free_port
from zae_limiter.storage.dynamodb.client import RetryPolicy

RPM = Limit.per_minute("rpm", 100)
TPM = Limit.per_minute("tpm", 10_000)
FAST = RetryPolicy(max_attempts=4, base_delay=0.005, max_delay=0.02, connect_timeout=0.5,
                   read_timeout=2.0)  # fmt: skip

Points = dict[frozenset[tuple[str, Any]], Any]


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()


@pytest.fixture
def metrics(provider: MeterProvider) -> Metrics:
    return Metrics(provider)


def exported(reader: InMemoryMetricReader) -> dict[str, Points]:
    """Every zae_limiter instrument's data points: attributes → value (a histogram's: count)."""
    data = reader.get_metrics_data()
    found: dict[str, Points] = {}
    for resource_metrics in data.resource_metrics if data else []:
        for scope in resource_metrics.scope_metrics:
            if scope.scope.name != "zae_limiter":
                continue
            for metric in scope.metrics:
                points = found.setdefault(metric.name, {})
                for point in metric.data.data_points:
                    key = frozenset((point.attributes or {}).items())
                    value = point.count if isinstance(point, HistogramDataPoint) else point.value
                    points[key] = value
    return found


def attrs(**named: str) -> frozenset[tuple[str, str]]:
    names = {"resource": RESOURCE, "result": RESULT, "limit": LIMIT, "entity": ENTITY_ID,
             "operation": OPERATION}  # fmt: skip
    return frozenset((names[k], v) for k, v in named.items())


def by_operation(points: Points) -> dict[str, float]:
    return {dict(key)[OPERATION]: value for key, value in points.items()}


# -- the Metrics class alone ----------------------------------------------------------------


def test_outcomes_denials_and_latency_by_resource_and_result(
    reader: InMemoryMetricReader, metrics: Metrics
) -> None:
    for seconds in (0.000_004, 0.000_006, 0.003):
        metrics.acquired("gpt-4", "key-1", ADMITTED, seconds)
    metrics.acquired("gpt-4", "key-2", DENIED, 0.000_005, denied_by=("rpm", "tpm"))
    metrics.acquired("gpt-4", "key-2", DENIED, 0.000_005, denied_by=("tpm",))
    metrics.acquired("embed", "key-1", UNAVAILABLE, 2.0)
    metrics.acquired("embed", "key-1", FAIL_OPEN, 2.0)
    out = exported(reader)
    assert out["zae_limiter.acquires"] == {
        attrs(resource="gpt-4", result=ADMITTED): 3,
        attrs(resource="gpt-4", result=DENIED): 2,
        attrs(resource="embed", result=UNAVAILABLE): 1,
        attrs(resource="embed", result=FAIL_OPEN): 1,
    }
    assert out["zae_limiter.limit.denials"] == {
        attrs(resource="gpt-4", limit="rpm"): 1,
        attrs(resource="gpt-4", limit="tpm"): 2,
    }
    assert out["zae_limiter.acquire.duration"] == out["zae_limiter.acquires"]
    # The buckets tell microseconds from milliseconds (the SDK's default ones start at 5 s).
    histogram = next(
        m.data.data_points[0]
        for rm in reader.get_metrics_data().resource_metrics  # type: ignore[union-attr]
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "zae_limiter.acquire.duration"
        and dict(m.data.data_points[0].attributes or {}).get(RESULT) == ADMITTED
    )
    assert isinstance(histogram, HistogramDataPoint)
    assert histogram.sum == pytest.approx(0.003_01)
    assert sum(histogram.bucket_counts[:2]) == 2  # the two acquires under 25 µs


def test_entity_ids_only_when_asked(reader: InMemoryMetricReader, provider: MeterProvider) -> None:
    hidden = Metrics(provider)
    hidden.acquired("r", "secret-entity", DENIED, 0.001, denied_by=("rpm",))
    seen = exported(reader)
    everything = [k for points in seen.values() for k in points]
    assert everything and all(ENTITY_ID not in dict(k) for k in everything)
    assert all("secret-entity" not in dict(k).values() for k in everything)

    other = InMemoryMetricReader()
    shown = Metrics(MeterProvider(metric_readers=[other]), entity_ids=True)
    shown.acquired("r", "key-7", DENIED, 0.001, denied_by=("rpm",))
    out = exported(other)
    assert out["zae_limiter.acquires"] == {attrs(resource="r", result=DENIED, entity="key-7"): 1}
    assert out["zae_limiter.limit.denials"] == {attrs(resource="r", limit="rpm", entity="key-7"): 1}


def test_attribute_sets_stay_bounded_by_resources_and_results(
    reader: InMemoryMetricReader, metrics: Metrics
) -> None:
    resources = ("chat", "embed")
    for n in range(100):
        for resource in resources:
            for result in sorted(RESULTS):
                denied = ("rpm",) if result == DENIED else ()
                metrics.acquired(resource, f"entity-{n}", result, 0.001, denied_by=denied)
    out = exported(reader)
    assert len(out["zae_limiter.acquires"]) == len(resources) * len(RESULTS)
    assert len(out["zae_limiter.acquire.duration"]) == len(resources) * len(RESULTS)
    assert len(out["zae_limiter.limit.denials"]) == len(resources)
    assert set(out["zae_limiter.acquires"].values()) == {100}


def test_several_metrics_on_one_provider_add_up(
    reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    """A provider keeps the first callbacks registered under a name: the second `Metrics` must
    not be dropped."""
    first, second = Metrics(provider), Metrics(provider)
    first.acquired("r", "a", ADMITTED, 0.001)
    second.acquired("r", "b", ADMITTED, 0.001)
    second.called("GetItem", 0.5, 0.0)
    out = exported(reader)
    assert out["zae_limiter.acquires"] == {attrs(resource="r", result=ADMITTED): 2}
    assert out["zae_limiter.acquire.duration"] == {attrs(resource="r", result=ADMITTED): 2}
    assert by_operation(out["zae_limiter.dynamodb.read_capacity"]) == {"GetItem": 0.5}


def test_latency_sample_thins_the_histogram_not_the_counts(
    reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    none = Metrics(provider, latency_sample=0.0)
    for _ in range(50):
        none.acquired("none", "k", ADMITTED, 0.001)
    quarter = Metrics(provider, latency_sample=0.25)
    for _ in range(2000):
        quarter.acquired("quarter", "k", ADMITTED, 0.001)
    out = exported(reader)
    assert out["zae_limiter.acquires"][attrs(resource="none", result=ADMITTED)] == 50
    assert out["zae_limiter.acquires"][attrs(resource="quarter", result=ADMITTED)] == 2000
    durations = out["zae_limiter.acquire.duration"]
    assert attrs(resource="none", result=ADMITTED) not in durations
    # Binomial(2000, 0.25): mean 500, sd ~19; these bounds are 10 sd away.
    assert 300 < durations[attrs(resource="quarter", result=ADMITTED)] < 700


def test_a_noop_without_opentelemetry(
    reader: InMemoryMetricReader, provider: MeterProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # `import opentelemetry` fails
    metrics = Metrics(provider)
    assert metrics.enabled is False
    metrics.acquired("r", "k", ADMITTED, 0.001)
    metrics.called("GetItem", 1.0, 0.0)
    metrics.throttled("UpdateItem")
    metrics.retried("UpdateItem")
    metrics.conflicted("r")
    monkeypatch.undo()
    assert exported(reader) == {}
    assert NO_METRICS.enabled is False


def test_series_stay_bounded_when_resources_come_from_requests(
    reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    """10,000 resources (an attacker choosing the path): each instrument keeps the default
    `max_series` attribute sets and one overflow series, and no count is lost."""
    metrics = Metrics(provider, entity_ids=True)
    for n in range(10_000):
        metrics.acquired(f"res-{n}", f"key-{n}", DENIED, 0.001, denied_by=("rpm",))
    out = exported(reader)
    overflow = frozenset({(OVERFLOW_ATTRIBUTE, True)})
    names = ("zae_limiter.acquires", "zae_limiter.limit.denials", "zae_limiter.acquire.duration")
    for name in names:
        points = out[name]
        assert len(points) == DEFAULT_MAX_SERIES + 1, name
        assert sum(points.values()) == 10_000, name
        assert points[overflow] == 10_000 - DEFAULT_MAX_SERIES, name
    assert out["zae_limiter.acquires"][attrs(resource="res-0", result=DENIED, entity="key-0")] == 1
    small = Metrics(provider, max_series=3)
    for n in range(5):
        small.called(f"Op{n}", 1.0, 0.0)
    calls = exported(reader)["zae_limiter.dynamodb.calls"]
    assert len(calls) == 4 and calls[overflow] == 2


def test_bad_arguments_name_their_field(provider: MeterProvider) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("max_series", {"max_series": 0}),
        ("max_series", {"max_series": True}),
        ("entity_ids", {"entity_ids": "yes"}),
        ("latency_sample", {"latency_sample": 1.5}),
        ("latency_sample", {"latency_sample": True}),
        ("enabled", {"enabled": 1}),
        ("meter_provider", {"meter_provider": object()}),
    ]
    for field, kwargs in cases:
        with pytest.raises(ValidationError) as info:
            Metrics(**{"meter_provider": provider, **kwargs})
        assert info.value.field == field
    with pytest.raises(ValidationError) as info:
        Metrics(provider).acquired("r", "k", "maybe", 0.001)
    assert info.value.field == "result"
    with pytest.raises(ValidationError) as info:
        RateLimiter(name="test", metrics="otel")  # type: ignore[arg-type]
    assert info.value.field == "metrics"


# -- limiters on memory ---------------------------------------------------------------------


@pytest.fixture
def store() -> MemoryStorage:
    return MemoryStorage("ZAEL-test")


@pytest.fixture
async def limiter(store: MemoryStorage, metrics: Metrics) -> AsyncIterator[RateLimiter]:
    async with RateLimiter(name="test", repository=store, metrics=metrics) as lim:
        yield lim


def test_the_sync_limiter_passes_its_metrics_on(
    reader: InMemoryMetricReader, metrics: Metrics, store: MemoryStorage
) -> None:
    with SyncRateLimiter(name="test", repository=store, metrics=metrics) as limiter:
        limiter.create_entity("k1")
        calls = dict(limiter.ledger.calls)
    assert calls["PutItem"] >= 1
    assert by_operation(exported(reader)["zae_limiter.dynamodb.calls"]) == calls


async def test_write_conflicts_between_two_limiters(
    reader: InMemoryMetricReader, metrics: Metrics, store: MemoryStorage
) -> None:
    """Each limiter decides on its cached bucket state: after the other one took the last
    tokens, the first one's conditional write is refused (a conflict); it decides again on the
    current state and denies."""
    few = Limit.per_minute("few", 3)

    def frozen() -> int:  # no refill between the acquires
        return 1_800_000_000_000

    async with (
        RateLimiter(name="test", repository=store, clock=frozen, metrics=metrics) as first,
        RateLimiter(name="test", repository=store, clock=frozen) as second,
    ):
        async with first.acquire("k1", "chat", [few], {"few": 1}):
            pass
        async with second.acquire("k1", "chat", [few], {"few": 2}):
            pass
        with pytest.raises(RateLimitExceeded):
            async with first.acquire("k1", "chat", [few], {"few": 1}):
                pass
        conflicts = first.ledger.conflicts
    assert conflicts == 1
    out = exported(reader)
    assert out["zae_limiter.write.conflicts"] == {attrs(resource="chat"): 1}


async def test_acquire_outcomes_through_the_limiter(
    reader: InMemoryMetricReader, metrics: Metrics, limiter: RateLimiter
) -> None:
    """Needs `RateLimiter._admit` to report each decision to `self.metrics`."""
    one = Limit.per_minute("one", 2)
    for _ in range(2):
        async with limiter.acquire("k1", "chat", [one], {"one": 1}):
            pass
    with pytest.raises(RateLimitExceeded):
        async with limiter.acquire("k1", "chat", [one], {"one": 1}):
            pass
    down = f"http://127.0.0.1:{free_port()}"
    retry = RetryPolicy(max_attempts=2, base_delay=0.001, connect_timeout=0.5, read_timeout=0.5)
    async with RateLimiter(name="test", endpoint_url=down, retry=retry, metrics=metrics) as gone:
        with pytest.raises(RateLimiterUnavailable):
            async with gone.acquire("k1", "chat", [one], {"one": 1}):
                pass
        async with gone.acquire(
            "k1", "chat", [one], {"one": 1}, failure_mode=FailureMode.FAIL_OPEN
        ):
            pass
    out = exported(reader)
    expected = {
        attrs(resource="chat", result=ADMITTED): 2,
        attrs(resource="chat", result=DENIED): 1,
        attrs(resource="chat", result=UNAVAILABLE): 1,
        attrs(resource="chat", result=FAIL_OPEN): 1,
    }
    assert out.get("zae_limiter.acquires") == expected
    assert out.get("zae_limiter.acquire.duration") == expected
    assert out.get("zae_limiter.limit.denials") == {attrs(resource="chat", limit="one"): 1}
    # The unreachable endpoint's connection attempts were retried, and reported.
    assert sum(by_operation(out["zae_limiter.dynamodb.retries"]).values()) >= 1


# -- limiters on moto: the repository's own calls, throttles and failures -------------------


@pytest.mark.integration
async def test_dynamodb_calls_and_units_equal_the_ledgers(
    reader: InMemoryMetricReader, metrics: Metrics, endpoint_url: str
) -> None:
    async with RateLimiter(
        name="test", endpoint_url=endpoint_url, stack_options=StackOptions(), metrics=metrics
    ) as limiter:
        await limiter.create_entity("proj")
        await limiter.create_entity("k1", parent_id="proj")
        await limiter.set_limits("k1", [RPM, TPM], "chat")
        for _ in range(3):
            async with limiter.acquire("k1", "chat", None, {"rpm": 1}, use_stored_limits=True):
                pass
        await limiter.available("k1", "chat", [RPM])
        ledger = limiter.ledger
        out = exported(reader)
        # Table creation and the version record were counted too: the metrics saw every call.
        calls = {op: n for op, n in ledger.calls.items() if not op.endswith(":throttled")}
        assert {"GetItem", "PutItem", "UpdateItem"} <= set(calls)
        assert by_operation(out["zae_limiter.dynamodb.calls"]) == calls
        read = by_operation(out["zae_limiter.dynamodb.read_capacity"])
        write = by_operation(out["zae_limiter.dynamodb.write_capacity"])
        assert sum(read.values()) == pytest.approx(ledger.read_units) and ledger.read_units > 0
        assert sum(write.values()) == pytest.approx(ledger.write_units) and ledger.write_units > 0
        assert write["UpdateItem"] >= 3


@pytest.fixture
def proxy(moto_server: LocalDynamoDB, endpoint_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.port) as proxy:
        yield proxy


@pytest.mark.integration
async def test_retries_counted_under_throttling(
    reader: InMemoryMetricReader, metrics: Metrics, proxy: FaultProxy
) -> None:
    async with RateLimiter(
        name="test",
        endpoint_url=proxy.endpoint_url,
        stack_options=StackOptions(),
        retry=FAST,
        metrics=metrics,
    ) as limiter:
        async with limiter.acquire("k1", "chat", [RPM], {"rpm": 1}):
            pass
        proxy.reset_stats()
        proxy.inject("throttle", ops={"UpdateItem"}, count=2)
        async with limiter.acquire("k1", "chat", [RPM], {"rpm": 1}):
            pass
        assert await limiter.available("k1", "chat", [RPM]) == {"rpm": 98}
        throttled = limiter.ledger.calls["update_item:throttled"]
    assert len(proxy.requests("UpdateItem")) == 3  # two throttled, the third answered
    assert throttled == 2
    out = exported(reader)
    assert by_operation(out["zae_limiter.dynamodb.throttles"]) == {"UpdateItem": 2}
    assert by_operation(out["zae_limiter.dynamodb.retries"]) == {"UpdateItem": 2}


@pytest.mark.integration
async def test_unconfirmed_give_backs_counted_by_resource_and_limit(
    reader: InMemoryMetricReader, metrics: Metrics, proxy: FaultProxy
) -> None:
    """A release whose write fails is not sent again (it might land twice): its tokens are
    reported, per resource and limit, and only its own."""
    async with RateLimiter(
        name="test",
        endpoint_url=proxy.endpoint_url,
        stack_options=StackOptions(),
        retry=FAST,
        metrics=metrics,
    ) as limiter:
        async with limiter.acquire("k1", "chat", [RPM, TPM], {"rpm": 1, "tpm": 500}) as lease:
            await lease.release(tpm=100)  # lands: not counted
            proxy.inject("error500", ops={"UpdateItem"}, count=1)
            with pytest.raises(RateLimiterUnavailable):
                await lease.release(tpm=300)
        assert limiter.ledger.unconfirmed_give_back_tokens == {"tpm": 300}
    out = exported(reader)
    assert out["zae_limiter.give_back.unconfirmed"] == {attrs(resource="chat", limit="tpm"): 300}


# -- metrics someone can see: the warning when nobody can, Prometheus --------------------------

# Collects the "zae_limiter" logger's records and prints them last, as JSON: the warning is once
# per process, so each case is a process of its own.
WATCH = """
import json, logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append([record.levelname, record.getMessage()])
logging.getLogger("zae_limiter").addHandler(Keep())
"""
ONE_ACQUIRE_EACH = """
from zae_limiter import Limit, MemoryStorage, SyncRateLimiter
store = MemoryStorage("ZAEL-test")
for metrics in made:
    with SyncRateLimiter(name="test", repository=store, metrics=metrics) as limiter:
        for _ in range(3):
            with limiter.acquire("k1", "chat", [Limit.per_minute("rpm", 100)], {"rpm": 1}):
                pass
"""


def logged(code: str) -> list[list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", WATCH + code + "\nprint(json.dumps(records))"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records: list[list[str]] = json.loads(result.stdout.splitlines()[-1])
    return records


def test_no_meter_provider_warns_once_per_process() -> None:
    """Three `Metrics()` on the global provider, none set: three limiters' acquires, one
    WARNING naming the call to make and the extra."""
    code = "from zae_limiter import Metrics\nmade = [Metrics() for _ in range(3)]\n"
    records = logged(code + ONE_ACQUIRE_EACH)
    assert len(records) == 1, records
    level, message = records[0]
    assert level == "WARNING"
    assert "set_meter_provider" in message
    assert "pip install 'zae-limiter[otel]'" in message


def test_a_provider_set_before_acquires_start_is_no_warning() -> None:
    """The documented order (a `Metrics()` made first, the provider set at startup) and an
    explicit provider with none set globally: both export, neither warns."""
    code = """
from opentelemetry import metrics as otel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from zae_limiter import Metrics
explicit = Metrics(MeterProvider(metric_readers=[InMemoryMetricReader()]))
early = Metrics()
otel.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
made = [explicit, early, Metrics()]
"""
    assert logged(code + ONE_ACQUIRE_EACH) == []


def test_no_opentelemetry_api_warns_once_per_process() -> None:
    code = """
sys.modules["opentelemetry"] = None
from zae_limiter import Metrics
made = [Metrics() for _ in range(3)]
assert not any(metrics.enabled for metrics in made)
"""
    records = logged(code + ONE_ACQUIRE_EACH)
    assert len(records) == 1, records
    level, message = records[0]
    assert level == "WARNING"
    assert "opentelemetry-api is not installed" in message
    assert "pip install 'zae-limiter[otel]'" in message


def prometheus_snippet() -> str:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    section = doc.split("\n## Prometheus\n", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found is not None, "docs/metrics.md: no Python block under ## Prometheus"
    return found.group(1)


def test_the_prometheus_setup_in_the_docs_serves_the_metrics() -> None:
    """docs/metrics.md's snippet as written (on a free port instead of 9464), then one acquire
    on a limiter sharing its `Metrics`; the endpoint it started answers with the counts."""
    snippet = prometheus_snippet()
    assert "start_http_server(9464)" in snippet
    port = free_port()
    probe = f"""
import asyncio, urllib.request
from zae_limiter import Limit, MemoryStorage

async def one_acquire():
    async with RateLimiter(name="probe", repository=MemoryStorage("ZAEL-probe"),
                           metrics=limiter.metrics) as probe:
        async with probe.acquire("k1", "chat", [Limit.per_minute("rpm", 10)], {{"rpm": 1}}):
            pass

asyncio.run(one_acquire())
print(urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
"""
    result = subprocess.run(
        [sys.executable, "-c", snippet.replace("9464", str(port)) + probe],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    scraped = result.stdout
    acquires = re.search(r'^zae_limiter_acquires_total\{(.*)\} (\S+)$', scraped, re.M)
    assert acquires is not None, scraped
    assert 'zae_limiter_result="admitted"' in acquires.group(1)
    assert float(acquires.group(2)) == 1.0
    assert re.search(r"^zae_limiter_acquire_duration_seconds_count\{.*\} 1\.0$", scraped, re.M)
