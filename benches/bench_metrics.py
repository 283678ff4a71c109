"""What metrics cost an acquire: `Metrics.acquired` per call, against a locally served acquire.

An acquire served from reserved tokens (no I/O) takes a few microseconds, so its report must
cost a fraction of that. Measured in one run, on the OpenTelemetry SDK with an in-memory reader
(median wall time per call, µs):

- `acquired` with the latency recorded for every acquire (`latency_sample=1.0`, the default),
  for one in ten (`0.1`) and never (`0.0`: the outcome counts alone);
- `NO_METRICS.acquired` (a limiter without metrics);
- a DynamoDB call's report to the ledger, with a `Metrics` observing it and without;
- a warm acquire + exit served from reservations on moto's server, 2 limits (the reference).

`pytest benches/bench_metrics.py -s` prints the table; `--benchmark-enable` runs longer. The
counts exported are asserted (every call was counted); timings are reported only.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from zae_limiter import Limit, RateLimiter, Reservations, StackOptions
from zae_limiter.metrics import ADMITTED, NO_METRICS, Metrics
from zae_limiter.storage.capacity import CapacityLedger

TWO = [Limit.per_minute("rpm", 10**6), Limit.per_minute("tpm", 10**9)]


def per_call_us(call: Callable[[], object], n: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(n):
            call()
        samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples)


async def local_acquire_us(endpoint_url: str, n: int, repeats: int) -> float:
    async with RateLimiter(
        name="metricsbench",
        endpoint_url=endpoint_url,
        stack_options=StackOptions(),
        reservations=Reservations(),
    ) as limiter:
        for _ in range(200):  # warm: the table, the bucket, the blocks' sizes
            async with limiter.acquire("cpu", "llm", TWO, {"rpm": 1, "tpm": 100}):
                pass
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(n):
                async with limiter.acquire("cpu", "llm", TWO, {"rpm": 1, "tpm": 100}):
                    pass
            samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples)


def exported_acquires(reader: InMemoryMetricReader) -> float:
    data = reader.get_metrics_data()
    assert data is not None
    return sum(
        point.value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "zae_limiter.acquires"
        for point in metric.data.data_points  # type: ignore[union-attr]
    )


def test_cost_of_metrics_per_acquire(
    moto_server: Any, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    timed = bool(request.config.getoption("benchmark_enable", default=False))
    n, repeats = (50_000, 7) if timed else (2_000, 3)
    moto_server.reset()
    reference = asyncio.run(local_acquire_us(moto_server.endpoint_url, n // 4, repeats))
    rows: list[tuple[str, float]] = []
    calls = 0
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        for sample in (1.0, 0.1, 0.0):
            metrics = Metrics(provider, latency_sample=sample)
            cost = per_call_us(lambda m=metrics: m.acquired("llm", "k", ADMITTED, 4e-6), n, repeats)
            calls += n * repeats
            rows.append((f"acquired, latency_sample={sample}", cost))
        rows.append(
            (
                "NO_METRICS.acquired",
                per_call_us(lambda: NO_METRICS.acquired("llm", "k", ADMITTED, 4e-6), n, repeats),
            )
        )
        bare, observed = CapacityLedger(), CapacityLedger()
        observed.attach(Metrics(provider))
        for name, ledger in (
            ("ledger.record, no observer", bare),
            ("ledger.record, observed", observed),
        ):
            rows.append(
                (name, per_call_us(lambda lg=ledger: lg.record("GetItem", rcu=1.0), n, repeats))
            )
        assert exported_acquires(reader) == calls
    finally:
        provider.shutdown()
    with capsys.disabled():
        print("\nMetrics cost per call (median µs; ratio to a locally served acquire + exit)")
        print(f"  {'local acquire + exit (reservations, 2 limits)':48} {reference:8.2f}   1.00")
        for name, cost in rows:
            print(f"  {name:48} {cost:8.2f}   {cost / reference:.2f}")
    assert reference > 0 and all(cost > 0 for _, cost in rows)
