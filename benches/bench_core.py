"""One acquire decision, native core vs pure-Python reference.

``pytest benches/bench_core.py`` benchmarks with pytest-benchmark; with ``--benchmark-disable``
(CI's fast mode) each benchmark runs once. ``test_speedup`` prints the native/python speed-up
per case, measured with plain ``time.perf_counter`` loops; timings are never asserted.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from zae_limiter.core import bucket as reference

native: ModuleType | None
try:
    native = importlib.import_module("zae_limiter._native")
except ImportError:  # pragma: no cover - the extension is built in CI
    native = None

NOW = 1_700_000_000_123
RPM = (100_000, 100_000, 60_000)
TPM = (10_000_000, 10_000_000, 60_000)

# Warm buckets (existing, not full): the common case, a relative write.
ENTITY = [
    (*RPM, reference.full_at_of(*RPM, 50_000, NOW - 1_234), 1_000),
    (*TPM, reference.full_at_of(*TPM, 5_000_000, NOW - 1_234), 2_000_000),
]
PARENT = [
    (*RPM, reference.full_at_of(*RPM, 70_000, NOW - 4_321), 1_000),
    (*TPM, reference.full_at_of(*TPM, 8_000_000, NOW - 4_321), 2_000_000),
]
CASES = {
    "1-limit": ENTITY[:1],
    "2-limits": ENTITY,
    "2-limits+cascade": ENTITY + PARENT,
}
BACKENDS: dict[str, Any] = {"python": reference}
if native is not None:
    BACKENDS["native"] = native


def _decide(core: Any, buckets: list[Any]) -> Callable[[], Any]:
    decide = core.decide

    def run() -> Any:
        return decide(buckets, NOW, True)

    return run


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_decide(benchmark: Any, backend: str, case: str) -> None:
    benchmark.group = f"decide {case}"
    admitted, outcomes = benchmark(_decide(BACKENDS[backend], CASES[case]))
    assert admitted
    assert len(outcomes) == len(CASES[case])


def _loops(fn: Callable[[], Any], budget_s: float) -> int:
    """How many calls take about ``budget_s``."""
    fn()
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - start >= budget_s or n >= 1 << 20:
            return n
        n *= 2


def _per_call(fns: dict[str, Callable[[], Any]], rounds: int = 7) -> dict[str, float]:
    """Seconds per call, best of ``rounds``; the functions alternate, so a busy machine slows
    both alike (about 0.2 s in all)."""
    loops = {name: _loops(fn, 0.005) for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / loops[name])
    return best


@pytest.mark.skipif(native is None, reason="native extension not built")
def test_speedup(capsys: pytest.CaptureFixture[str]) -> None:
    lines = []
    for case, buckets in CASES.items():
        assert repr(_decide(native, buckets)()) == repr(_decide(reference, buckets)())
        t = _per_call({"python": _decide(reference, buckets), "native": _decide(native, buckets)})
        py, rs = t["python"], t["native"]
        lines.append(
            f"decide {case:<17} python {py * 1e6:7.2f} µs  native {rs * 1e6:6.2f} µs  "
            f"native/python speed-up {py / rs:5.1f}x"
        )
    with capsys.disabled():
        print()
        print("\n".join(lines))
