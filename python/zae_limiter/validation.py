"""Input validation shared by the models and the limiter's public methods.

Each function returns the validated value (amounts normalised to a plain ``int``) or raises a
:class:`~zae_limiter.exceptions.ValidationError` subclass naming the offending field.
"""

from __future__ import annotations

import numbers
import re

from .exceptions import InvalidIdentifierError, InvalidNameError, ValidationError
from .schema import DEFAULT_RESOURCE, RESOURCE_AUDIT_PREFIX, SYSTEM_AUDIT_ID

__all__ = [
    "DEFAULT_RESOURCE",
    "MAX_AMOUNT",
    "MAX_IDENTIFIER_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_RESOURCE_LENGTH",
    "check_int",
    "validate_amount",
    "validate_audit_id",
    "validate_entity_id",
    "validate_name",
    "validate_principal",
    "validate_resource",
    "validate_signed_amount",
]

MAX_IDENTIFIER_LENGTH = 256
MAX_NAME_LENGTH = 64
MAX_RESOURCE_LENGTH = 256

# Amounts are stored as millitokens in signed 64-bit integers (max ~9.2e18); 10**15 tokens is
# 10**18 millitokens, leaving headroom for sums of a few amounts before anything overflows.
MAX_AMOUNT = 10**15


# '#' is the key delimiter in the table (see docs/design.md section 2) and is excluded by every
# pattern. Explicit ASCII ranges plus re.ASCII keep Unicode look-alikes (Cyrillic 'а', fullwidth
# digits) out, and fullmatch avoids '$' matching before a trailing newline.
_IDENTIFIER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-:@]*", re.ASCII)
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*", re.ASCII)
_RESOURCE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*(?:/[A-Za-z0-9_.\-]+)*", re.ASCII)
# 0.2.0's identifier characters, plus those of IAM ARNs and e-mail addresses ("/", "+", "=",
# ","), so `arn:aws:iam::123456789012:user/alice` and `ops+oncall@example.com` are principals.
_PRINCIPAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-:@/+=,]*", re.ASCII)


def _identifier(
    value: object, field: str, pattern: re.Pattern[str], empty: str, allowed: str
) -> str:
    """The checks an identifier-like value shares (entity ids, principals): a non-empty string
    of at most 256 characters without the key delimiter, matching `pattern`."""
    if not isinstance(value, str):
        raise InvalidIdentifierError(field, value, f"must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidIdentifierError(field, value, empty)
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise InvalidIdentifierError(
            field, value, f"exceeds maximum length of {MAX_IDENTIFIER_LENGTH}"
        )
    if "#" in value:
        raise InvalidIdentifierError(field, value, "cannot contain '#' (reserved delimiter)")
    if pattern.fullmatch(value) is None:
        raise InvalidIdentifierError(
            field, value, f"must start with an ASCII letter or digit and contain only {allowed}"
        )
    return value


def validate_entity_id(value: object, field: str = "entity_id") -> str:
    """Validate an identifier (entity or parent id).

    1..256 ASCII characters: a letter or digit, then letters, digits, ``_ . - : @``.
    """
    return _identifier(
        value,
        field,
        _IDENTIFIER_RE,
        "cannot be empty",
        "ASCII letters, digits, underscore, hyphen, dot, colon or @",
    )


def validate_audit_id(value: object, field: str = "entity_id") -> str:
    """The id of an audit trail: an entity id, `$SYSTEM` (the system default limits' trail) or
    `$RESOURCE:<resource>` (a resource's default limits')."""
    if value == SYSTEM_AUDIT_ID:
        return value
    if isinstance(value, str) and value.startswith(RESOURCE_AUDIT_PREFIX):
        validate_resource(value[len(RESOURCE_AUDIT_PREFIX) :], field)
        return value
    return validate_entity_id(value, field)


def validate_name(value: object, field: str = "limit_name") -> str:
    """Validate a limit name: 1..64 ASCII characters, a letter then letters, digits, ``_ . -``."""
    if not isinstance(value, str):
        raise InvalidNameError(field, value, f"must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidNameError(field, value, "cannot be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidNameError(field, value, f"exceeds maximum length of {MAX_NAME_LENGTH}")
    if "#" in value:
        raise InvalidNameError(field, value, "cannot contain '#' (reserved delimiter)")
    if _NAME_RE.fullmatch(value) is None:
        raise InvalidNameError(
            field,
            value,
            "must start with an ASCII letter and contain only ASCII letters, digits, "
            "underscore, hyphen or dot",
        )
    return value


def validate_resource(value: object, field: str = "resource") -> str:
    """Validate a resource name.

    1..256 ASCII characters: a letter, then letters, digits, ``_ . -``, optionally followed by
    non-empty ``/``-separated segments (``openai/gpt-4o``). The reserved ``_default_`` is also
    accepted.
    """
    if not isinstance(value, str):
        raise InvalidNameError(field, value, f"must be a string, not {type(value).__name__}")
    if value == DEFAULT_RESOURCE:
        return value
    if not value:
        raise InvalidNameError(field, value, "cannot be empty")
    if len(value) > MAX_RESOURCE_LENGTH:
        raise InvalidNameError(field, value, f"exceeds maximum length of {MAX_RESOURCE_LENGTH}")
    if "#" in value:
        raise InvalidNameError(field, value, "cannot contain '#' (reserved delimiter)")
    if _RESOURCE_RE.fullmatch(value) is None:
        raise InvalidNameError(
            field,
            value,
            "must start with an ASCII letter and contain only ASCII letters, digits, "
            "underscore, hyphen, dot, or '/' between non-empty segments",
        )
    return value


def validate_principal(value: object, field: str = "principal") -> str | None:
    """Validate who made a change (recorded in its audit event); None: not said.

    1..256 ASCII characters: a letter or digit, then letters, digits, ``_ . - : @ / + = ,``
    (no '#', no spaces or control characters).
    """
    if value is None:
        return None
    return _identifier(
        value,
        field,
        _PRINCIPAL_RE,
        "cannot be empty (pass None for no principal)",
        "ASCII letters, digits and _ . - : @ / + = ,",
    )


def _as_int(value: object, field: str) -> int:
    # bool is an int subclass but True as "1 token" is always a bug; floats are rejected even
    # when integral so that 0.1+0.2-style inputs never silently round.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValidationError(field, value, f"must be an integer, not {type(value).__name__}")
    return int(value)


def validate_amount(value: object, field: str = "amount") -> int:
    """Validate a consumption amount: an integer in ``0..10**15``."""
    n = _as_int(value, field)
    if n < 0:
        raise ValidationError(field, value, "must be >= 0")
    if n > MAX_AMOUNT:
        raise ValidationError(field, value, f"must be <= {MAX_AMOUNT}")
    return n


def validate_signed_amount(value: object, field: str = "amount") -> int:
    """Validate an adjustment amount: an integer with ``|value| <= 10**15``."""
    n = _as_int(value, field)
    if abs(n) > MAX_AMOUNT:
        raise ValidationError(field, value, f"must be between {-MAX_AMOUNT} and {MAX_AMOUNT}")
    return n


def check_int(name: str, value: object, lo: int, hi: int) -> None:
    """An int (not a bool) in [lo, hi], else a `ValidationError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(name, value, f"must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValidationError(name, value, f"must be between {lo} and {hi}")
