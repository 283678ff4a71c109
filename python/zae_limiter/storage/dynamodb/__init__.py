"""DynamoDB storage through aioboto3: `Repository` (the `Storage` interface, `repository`), its
client and retry policy (`client`), the requests it builds (`requests`), the item codec
(`codec`), and the lean transport of the bucket calls (`transport`).

`Repository` and `RetryPolicy` load aioboto3 on first use, so the light parts of this package
(`endpoint`, `codec`, `requests`) can be imported without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import RetryPolicy
    from .repository import Repository

__all__ = ["Repository", "RetryPolicy"]
_HOMES = {"Repository": "repository", "RetryPolicy": "client"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
