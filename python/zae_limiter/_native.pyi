"""Type stub of the Rust extension (rust/src/python.rs); same API as ``zae_limiter.bucket``."""

from collections.abc import Sequence
from typing import final

__all__ = ["Outcome", "available", "decide", "refill", "time_until_available"]

# A type alias of the stub only (the extension has no such name).
_BucketInput = tuple[int, int, int, int | None, int | None, int]

@final
class Outcome:
    """One bucket's outcome of `decide` (docs/design.md section 1)."""

    @property
    def available_milli(self) -> int: ...
    @property
    def exceeded(self) -> bool: ...
    @property
    def retry_after_ms(self) -> int | None: ...
    @property
    def write_mode(self) -> int: ...
    @property
    def write_value(self) -> int: ...
    @property
    def new_tokens_milli(self) -> int: ...
    @property
    def new_last_refill_ms(self) -> int: ...
    @property
    def cond_lo(self) -> int | None: ...
    @property
    def cond_hi(self) -> int | None: ...

def decide(
    buckets: Sequence[_BucketInput], now_ms: int, check: bool, reanchor_ms: int
) -> tuple[bool, list[Outcome]]: ...
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
def time_until_available(buckets: Sequence[_BucketInput], now_ms: int) -> int | None: ...
