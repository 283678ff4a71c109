"""Type stub of the Rust extension (rust/src/python.rs); same API as ``zae_limiter.bucket``."""

from collections.abc import Sequence
from typing import final

__all__ = [
    "Block",
    "Outcome",
    "available",
    "decide",
    "full_at_of",
    "take_all",
    "time_until_available",
]

# A type alias of the stub only (the extension has no such name).
_BucketInput = tuple[int, int, int, int | None, int]

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
    def new_full_at(self) -> int | None: ...
    @property
    def cond_lo(self) -> int | None: ...
    @property
    def cond_hi(self) -> int | None: ...

def decide(
    buckets: Sequence[_BucketInput], now_ms: int, check: bool
) -> tuple[bool, list[Outcome]]: ...
def full_at_of(
    burst_milli: int,
    refill_amount_milli: int,
    refill_period_ms: int,
    tokens_milli: int,
    now_ms: int,
) -> int: ...
def available(
    burst_milli: int,
    refill_amount_milli: int,
    refill_period_ms: int,
    full_at: int | None,
    now_ms: int,
) -> int: ...
def time_until_available(buckets: Sequence[_BucketInput], now_ms: int) -> int | None: ...

@final
class Block:
    """Tokens reserved from one bucket item, per limit (docs/design.md "Reservations")."""

    def __new__(cls, limits: int) -> Block: ...
    @property
    def held(self) -> list[int]: ...
    @property
    def spent(self) -> list[int]: ...
    def add(self, amounts: Sequence[int]) -> None: ...
    def take(self, amounts: Sequence[int]) -> bool: ...
    def take_up_to(self, amounts: Sequence[int]) -> list[int]: ...
    def drain(self) -> list[int]: ...
    def take_spent(self) -> list[int]: ...

def take_all(blocks: Sequence[Block], amounts: Sequence[Sequence[int]]) -> bool: ...
