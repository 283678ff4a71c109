"""Type stub of the Rust extension (rust/src/python.rs); same API as ``zae_limiter.bucket``."""

from collections.abc import Sequence

BucketInput = tuple[int, int, int, int | None, int | None, int]
BucketOutcome = tuple[int, bool, int | None, int, int, int, int, int | None, int | None]

def decide(
    buckets: Sequence[BucketInput], now_ms: int, check: bool, reanchor_ms: int
) -> tuple[bool, list[BucketOutcome]]: ...
def refill(
    burst_milli: int,
    refill_amount_milli: int,
    refill_period_ms: int,
    tokens_milli: int,
    last_refill_ms: int,
    now_ms: int,
) -> tuple[int, int]: ...
def available(
    burst_milli: int,
    refill_amount_milli: int,
    refill_period_ms: int,
    tokens_milli: int | None,
    last_refill_ms: int | None,
    now_ms: int,
) -> int: ...
def time_until_available(buckets: Sequence[BucketInput], now_ms: int) -> int | None: ...
