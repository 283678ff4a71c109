"""The token-bucket core, from the Rust extension when available.

``BACKEND`` is ``"native"`` (``zae_limiter._native``) unless the environment variable
``ZAE_LIMITER_NATIVE`` is ``"0"`` or the extension cannot be imported; then it is ``"python"``
(the reference ``zae_limiter.bucket``). Both implement docs/design.md section 1 identically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from . import bucket as _reference
from .bucket import FULL_AT_MAX, WRITE_ABSOLUTE, WRITE_ADD, WRITE_NONE, WRITE_RELATIVE, BucketInput

__all__ = [
    "BACKEND",
    "FULL_AT_MAX",
    "WRITE_ABSOLUTE",
    "WRITE_ADD",
    "WRITE_NONE",
    "WRITE_RELATIVE",
    "Block",
    "BucketInput",
    "Outcome",
    "available",
    "decide",
    "full_at_of",
    "take_all",
    "time_until_available",
]

if TYPE_CHECKING:
    from .. import _native as _native_types

# Either implementation's outcome: the same attributes (`bucket.Outcome` is the reference).
Outcome: TypeAlias = "_reference.Outcome | _native_types.Outcome"

BACKEND: Literal["native", "python"] = "python"

decide: Callable[[Sequence[BucketInput], int, bool], tuple[bool, Sequence[Outcome]]]
decide = _reference.decide
full_at_of = _reference.full_at_of
available = _reference.available
time_until_available = _reference.time_until_available
Block: type[_reference.Block] | type[_native_types.Block] = _reference.Block
take_all: Callable[[Sequence[Any], Sequence[Sequence[int]]], bool] = _reference.take_all

if os.environ.get("ZAE_LIMITER_NATIVE", "").strip() != "0":
    try:
        from .. import _native
    except ImportError:
        pass
    else:
        decide = _native.decide
        full_at_of = _native.full_at_of
        available = _native.available
        time_until_available = _native.time_until_available
        Block = _native.Block
        take_all = _native.take_all
        BACKEND = "native"
