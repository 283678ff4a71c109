"""The token-bucket core, from the Rust extension when available.

``BACKEND`` is ``"native"`` (``zae_limiter._native``) unless the environment variable
``ZAE_LIMITER_NATIVE`` is ``"0"`` or the extension cannot be imported; then it is ``"python"``
(the reference ``zae_limiter.bucket``). Both implement docs/design.md section 1 identically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from zae_limiter import bucket as _reference
from zae_limiter.bucket import (
    WRITE_ABSOLUTE,
    WRITE_ADD,
    WRITE_NONE,
    WRITE_RELATIVE,
    BucketInput,
)

__all__ = [
    "BACKEND",
    "WRITE_ABSOLUTE",
    "WRITE_ADD",
    "WRITE_NONE",
    "WRITE_RELATIVE",
    "BucketInput",
    "Outcome",
    "available",
    "decide",
    "refill",
    "time_until_available",
]



class Outcome(Protocol):
    """One bucket's outcome of `decide`: `zae_limiter.bucket.Outcome` or the native one."""

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


BACKEND: Literal["native", "python"] = "python"

decide: Callable[[Sequence[BucketInput], int, bool, int], tuple[bool, Sequence[Outcome]]]
decide = _reference.decide
refill = _reference.refill
available = _reference.available
time_until_available = _reference.time_until_available

if os.environ.get("ZAE_LIMITER_NATIVE", "").strip() != "0":
    try:
        from zae_limiter import _native
    except ImportError:
        pass
    else:
        decide = _native.decide
        refill = _native.refill
        available = _native.available
        time_until_available = _native.time_until_available
        BACKEND = "native"
