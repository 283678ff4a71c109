"""DynamoDB storage through aioboto3: `Repository` (the `Storage` interface), its retry policy,
and the lean transport of the bucket calls.

`Repository` and `RetryPolicy` load aioboto3 on first use, so the light parts of this package
(`endpoint`, the item codec) can be imported without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .repository import Repository, RetryPolicy

__all__ = ["Repository", "RetryPolicy"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(f"{__name__}.repository"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
