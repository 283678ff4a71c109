"""zae-limiter: distributed rate limiting for Python services, backed by DynamoDB.

```python
from zae_limiter import RateLimiter, Limit

limiter = RateLimiter(name="my-app", region="us-east-1")
async with limiter.acquire("api-key-1", "gpt-4", [Limit.per_minute("rpm", 100)],
                           consume={"rpm": 1}) as lease:
    ...
```

Models and exceptions are imported eagerly; the limiters (which need aioboto3) on first use, so
that the aggregator can import this package's pure-Python parts inside a bare Lambda runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .core import BACKEND
from .exceptions import (
    ConfigurationError,
    EntityError,
    EntityExistsError,
    EntityNotFoundError,
    IncompatibleSchemaError,
    InfrastructureError,
    InfrastructureNotFoundError,
    InvalidIdentifierError,
    InvalidNameError,
    MinimumClientVersionError,
    RateLimitError,
    RateLimiterUnavailable,
    RateLimitExceeded,
    RequestTooLarge,
    ResourceDisabled,
    StackAlreadyExistsError,
    StackCreationError,
    ValidationError,
    VersionError,
    VersionMismatchError,
    ZAELimiterError,
)
from .models import (
    AuditAction,
    AuditEvent,
    BucketState,
    Entity,
    EntityCapacity,
    FailureMode,
    Limit,
    LimitName,
    LimitStatus,
    Reservations,
    ResourceCapacity,
    StackOptions,
    UsageSnapshot,
    UsageSummary,
)

if TYPE_CHECKING:
    from .lease import Lease, SyncLease
    from .limiter import RateLimiter
    from .metrics import Metrics
    from .ops.stacks import StackManager
    from .storage.dynamodb.repository import Repository
    from .storage.memory import MemoryStorage
    from .sync import SyncRateLimiter

_LAZY = {
    "RateLimiter": ("limiter", "RateLimiter"),
    "SyncRateLimiter": ("sync", "SyncRateLimiter"),
    "Lease": ("lease", "Lease"),
    "SyncLease": ("lease", "SyncLease"),
    "Repository": ("repository", "Repository"),
    "Metrics": ("metrics", "Metrics"),
    "MemoryStorage": ("memory", "MemoryStorage"),
    "StackManager": ("stack_manager", "StackManager"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKEND",
    "AuditAction",
    "AuditEvent",
    "BucketState",
    "ConfigurationError",
    "Entity",
    "EntityCapacity",
    "EntityError",
    "EntityExistsError",
    "EntityNotFoundError",
    "FailureMode",
    "IncompatibleSchemaError",
    "InfrastructureError",
    "InfrastructureNotFoundError",
    "InvalidIdentifierError",
    "InvalidNameError",
    "Lease",
    "Limit",
    "LimitName",
    "LimitStatus",
    "MemoryStorage",
    "Metrics",
    "MinimumClientVersionError",
    "RateLimitError",
    "RateLimitExceeded",
    "RateLimiter",
    "RateLimiterUnavailable",
    "Repository",
    "RequestTooLarge",
    "Reservations",
    "ResourceCapacity",
    "ResourceDisabled",
    "StackAlreadyExistsError",
    "StackCreationError",
    "StackManager",
    "StackOptions",
    "SyncLease",
    "SyncRateLimiter",
    "UsageSnapshot",
    "UsageSummary",
    "ValidationError",
    "VersionError",
    "VersionMismatchError",
    "ZAELimiterError",
    "__version__",
]
