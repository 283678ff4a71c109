"""Validation rules: every rejection names its field, and look-alikes never slip through."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zae_limiter.exceptions import (
    InvalidIdentifierError,
    InvalidNameError,
    ValidationError,
    ZAELimiterError,
)
from zae_limiter.validation import (
    DEFAULT_RESOURCE,
    MAX_AMOUNT,
    validate_amount,
    validate_entity_id,
    validate_name,
    validate_resource,
    validate_signed_amount,
)

ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-:@"
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"

# Look-alikes: Cyrillic a/o/e, fullwidth digit, Kelvin sign, dotless i, non-breaking space,
# zero-width space, superscript two, Arabic-Indic digit.
LOOKALIKES = ["\u0430", "\u043e", "\u0435", "\uff11", "\u212a", "\u0131", "\u00a0", "\u200b"]
LOOKALIKES += ["\u00b2", "\u0661"]


# ---------------------------------------------------------------------------
# entity ids
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "k1",
        "a",
        "0",
        "sk-proj-abc_123",
        "user@example.com",
        "urn:tenant:42",
        "550e8400-e29b-41d4-a716-446655440000",
        "a" * 256,
        "A.b-c_d:e@f",
    ],
)
def test_entity_id_accepts(value: str) -> None:
    assert validate_entity_id(value) == value


@pytest.mark.parametrize(
    ("value", "reason_part"),
    [
        ("", "empty"),
        ("a" * 257, "maximum length"),
        ("a#b", "'#'"),
        ("#", "'#'"),
        ("k1\n", "must start"),
        ("\nk1", "must start"),
        (" k1", "must start"),
        ("k 1", "must start"),
        ("_k1", "must start"),
        ("-k1", "must start"),
        (".k1", "must start"),
        ("@k1", "must start"),
        ("a/b", "must start"),
        ("a\x00b", "must start"),
        ("a\tb", "must start"),
        ("k1\r\n", "must start"),
    ],
)
def test_entity_id_rejects(value: str, reason_part: str) -> None:
    with pytest.raises(InvalidIdentifierError) as info:
        validate_entity_id(value)
    assert info.value.field == "entity_id"
    assert "entity_id" in str(info.value)
    assert reason_part in info.value.reason


@pytest.mark.parametrize("char", LOOKALIKES)
def test_entity_id_rejects_unicode_lookalikes(char: str) -> None:
    for value in (f"k{char}1", f"{char}k1", char):
        with pytest.raises(InvalidIdentifierError) as info:
            validate_entity_id(value, field="parent_id")
        assert info.value.field == "parent_id"


@pytest.mark.parametrize("value", [None, 1, 1.0, b"k1", ["k1"], True])
def test_entity_id_rejects_non_strings_with_validation_error(value: object) -> None:
    with pytest.raises(InvalidIdentifierError) as info:
        validate_entity_id(value)
    assert info.value.field == "entity_id"
    assert "must be a string" in info.value.reason


def test_entity_id_error_is_value_error_and_library_error() -> None:
    with pytest.raises(ValueError):
        validate_entity_id("")
    with pytest.raises(ZAELimiterError):
        validate_entity_id("")


@given(st.text(alphabet=ID_CHARS, min_size=1, max_size=256))
def test_entity_id_property(value: str) -> None:
    if value[0].isascii() and value[0].isalnum():
        assert validate_entity_id(value) == value
    else:
        with pytest.raises(InvalidIdentifierError):
            validate_entity_id(value)


@given(st.text(min_size=1, max_size=40))
def test_entity_id_arbitrary_text_never_crashes_and_never_accepts_hash(value: str) -> None:
    try:
        validate_entity_id(value)
    except InvalidIdentifierError as exc:
        assert exc.field == "entity_id"
    else:
        assert "#" not in value
        assert value.isascii()
        assert "\n" not in value


def test_long_value_is_truncated_in_error() -> None:
    with pytest.raises(InvalidIdentifierError) as info:
        validate_entity_id("a" * 300)
    assert isinstance(info.value.value, str)
    assert len(info.value.value) == 53
    assert info.value.value.endswith("...")


def test_value_is_not_leaked_into_message() -> None:
    secret = "sk-live-secret#value"
    with pytest.raises(InvalidIdentifierError) as info:
        validate_entity_id(secret)
    assert "secret" not in str(info.value)


# ---------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["rpm", "tpm", "a", "Z9", "gpt-4.turbo_x", "a" * 64])
def test_name_accepts(value: str) -> None:
    assert validate_name(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "a" * 65, "1rpm", "_rpm", "-rpm", "rp#m", "rpm\n", "rp m", "rp/m", "rp:m", "rp@m"],
)
def test_name_rejects(value: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_name(value)
    assert info.value.field == "limit_name"
    assert "limit_name" in str(info.value)


@pytest.mark.parametrize("char", LOOKALIKES)
def test_name_rejects_lookalikes(char: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_name(f"rp{char}")


@pytest.mark.parametrize("value", [None, 5, b"rpm", 1.5])
def test_name_rejects_non_strings(value: object) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_name(value, field="name")
    assert info.value.field == "name"


@given(st.text(alphabet=NAME_CHARS, min_size=1, max_size=64))
def test_name_property(value: str) -> None:
    if value[0].isascii() and value[0].isalpha():
        assert validate_name(value) == value
    else:
        with pytest.raises(InvalidNameError):
            validate_name(value)


# ---------------------------------------------------------------------------
# resources
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "gpt-4",
        "openai/gpt-4o",
        "api.v1",
        "a",
        "meta/llama-3/70b",
        "x/_y",
        DEFAULT_RESOURCE,
        "a" * 256,
    ],
)
def test_resource_accepts(value: str) -> None:
    assert validate_resource(value) == value


def test_default_resource_is_underscore_default() -> None:
    assert DEFAULT_RESOURCE == "_default_"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a" * 257,
        "_other_",
        "_default",
        "_default_\n",
        "/gpt",
        "gpt/",
        "a//b",
        "4o",
        "gpt#4",
        "gpt-4\n",
        "gpt 4",
        "gpt:4",
        "gpt\u20114",  # non-breaking hyphen
    ],
)
def test_resource_rejects(value: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_resource(value)
    assert info.value.field == "resource"
    assert "resource" in str(info.value)


@pytest.mark.parametrize("value", [None, 0, ("a",)])
def test_resource_rejects_non_strings(value: object) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_resource(value)
    assert info.value.field == "resource"


# ---------------------------------------------------------------------------
# amounts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 500, MAX_AMOUNT])
def test_amount_accepts(value: int) -> None:
    result = validate_amount(value, "amount")
    assert result == value
    assert type(result) is int


@pytest.mark.parametrize(
    "value",
    [
        -1,
        MAX_AMOUNT + 1,
        10**100,
        True,
        False,
        1.0,
        0.5,
        math.nan,
        math.inf,
        -math.inf,
        "5",
        None,
        Decimal(5),
        Fraction(5, 1),
        b"5",
    ],
)
def test_amount_rejects(value: object) -> None:
    with pytest.raises(ValidationError) as info:
        validate_amount(value, "tokens")
    assert info.value.field == "tokens"
    assert "tokens" in str(info.value)


def test_amount_default_field_name() -> None:
    with pytest.raises(ValidationError) as info:
        validate_amount(-1)
    assert info.value.field == "amount"


def test_amount_normalises_int_subclasses_to_int() -> None:
    import enum

    class Size(enum.IntEnum):
        BIG = 7

    result = validate_amount(Size.BIG)
    assert type(result) is int
    assert result == 7


@pytest.mark.parametrize("value", [0, -1, 1, -MAX_AMOUNT, MAX_AMOUNT])
def test_signed_amount_accepts(value: int) -> None:
    assert validate_signed_amount(value, "delta") == value


@pytest.mark.parametrize(
    "value", [MAX_AMOUNT + 1, -MAX_AMOUNT - 1, -(10**40), True, -1.0, math.nan, "1"]
)
def test_signed_amount_rejects(value: object) -> None:
    with pytest.raises(ValidationError) as info:
        validate_signed_amount(value, "delta")
    assert info.value.field == "delta"


@given(st.integers())
def test_amount_property(value: int) -> None:
    if 0 <= value <= MAX_AMOUNT:
        assert validate_amount(value) == value
    else:
        with pytest.raises(ValidationError):
            validate_amount(value)
    if -MAX_AMOUNT <= value <= MAX_AMOUNT:
        assert validate_signed_amount(value) == value
    else:
        with pytest.raises(ValidationError):
            validate_signed_amount(value)


def test_millitokens_of_max_amount_fit_signed_64_bit() -> None:
    assert MAX_AMOUNT * 1000 < 2**63 - 1
