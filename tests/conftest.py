"""Test-suite fixtures live in the repository's root `conftest.py` (shared with `benches/`)."""

import pytest


@pytest.fixture(autouse=True)
def _moto_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Limiters built in tests without a `deadline=` get 30 s instead of the library's 1 s: moto
    serializes ~100 requests/s and sometimes stalls for over a second, which a 1 s deadline
    turns into `RateLimiterUnavailable` with nothing wrong. The 1 s default itself and every
    bound are proven in tests/reliability/test_deadline.py and test_faults.py, which pass their
    deadlines explicitly."""
    from zae_limiter import RateLimiter, SyncRateLimiter

    for cls in (RateLimiter, SyncRateLimiter):
        defaults = dict(cls.__init__.__kwdefaults__ or {})
        defaults["deadline"] = 30.0
        monkeypatch.setattr(cls.__init__, "__kwdefaults__", defaults)
