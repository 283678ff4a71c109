"""How storage failures become the library's public errors, in one place.

Data-plane calls (`acquire`) meet outages under the limiter's failure mode; management calls
have none: an unreachable table is always an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .exceptions import RateLimiterUnavailable
from .storage import RepositoryUnavailable, StorageError

# What the failure mode applies to: the store could not be reached, kept failing, or refused the
# request (`StorageError`, e.g. throttling past the retries or a rejected request).
OUTAGES: tuple[type[BaseException], ...] = (RepositoryUnavailable, StorageError)


def unavailable(exc: BaseException) -> RateLimiterUnavailable:
    return RateLimiterUnavailable(f"rate limiter unavailable: {exc}", exc)


@contextmanager
def public_errors() -> Iterator[None]:
    """Outages and refusals surface as the public `RateLimiterUnavailable`, never as storage's
    own exception types: lease operations and management calls have no failure mode (storage
    itself raises `InfrastructureNotFoundError` for a missing table)."""
    try:
        yield
    except OUTAGES as exc:
        raise unavailable(exc) from exc
