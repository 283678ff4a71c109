"""Storage: what the engine and the tools need from a table, and its two implementations.

`protocol` defines the interface (`Storage` and its parts, the bucket state types and the
storage errors); `memory.MemoryStorage` keeps a table in a dict (users' tests, logic tests);
`dynamodb.Repository` is DynamoDB through aioboto3. Above this layer nothing knows which one it
talks to. The import of `MemoryStorage` here is cheap; DynamoDB's is not, so it stays in
`zae_limiter.storage.dynamodb`.
"""

from .memory import MemoryStorage
from .protocol import (
    AdminStorage,
    Backup,
    BucketItem,
    BucketStorage,
    ConditionFailed,
    EntityStorage,
    Item,
    LimitState,
    LimitWrite,
    RepositoryUnavailable,
    Storage,
    StorageError,
    StoredLimit,
    Switch,
    SwitchStorage,
    UsageStorage,
    WriteRefused,
)

__all__ = [
    "AdminStorage",
    "Backup",
    "BucketItem",
    "BucketStorage",
    "ConditionFailed",
    "EntityStorage",
    "Item",
    "LimitState",
    "LimitWrite",
    "MemoryStorage",
    "RepositoryUnavailable",
    "Storage",
    "StorageError",
    "StoredLimit",
    "Switch",
    "SwitchStorage",
    "UsageStorage",
    "WriteRefused",
]
