"""The text forms of a Limit: `Limit.parse` / `Limit.spec` (people, the CLI, JSON) and
`Limit.encode` / `Limit.decode` (the stored form), one grammar."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zae_limiter.exceptions import ValidationError
from zae_limiter.models import MAX_REFILL_PERIOD_SECONDS, Limit
from zae_limiter.validation import MAX_AMOUNT

names = st.from_regex(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}", fullmatch=True)
amounts = st.one_of(st.integers(1, 10_000), st.integers(1, MAX_AMOUNT))
periods = st.one_of(
    st.sampled_from([1, 60, 3600, 86400, 30, 7200]), st.integers(1, MAX_REFILL_PERIOD_SECONDS)
)


@st.composite
def limits(draw: st.DrawFn) -> Limit:
    capacity = draw(amounts)
    burst = draw(st.one_of(st.just(capacity), st.integers(capacity, MAX_AMOUNT)))
    return Limit(draw(names), capacity, burst, draw(amounts), draw(periods))


@given(limits())
def test_spec_round_trips(limit: Limit) -> None:
    assert Limit.parse(limit.spec) == limit
    assert Limit.parse(limit.spec).spec == limit.spec  # canonical: one text per limit


@given(limits())
def test_stored_form_round_trips_and_agrees_with_the_text_form(limit: Limit) -> None:
    encoded = limit.encode()
    assert Limit.decode(encoded, limit.name) == limit
    capacity, burst, refill, period = encoded.split(":")
    explicit = f"name={limit.name},capacity={capacity},burst={burst},refill={refill}"
    assert Limit.parse(f"{explicit},period={period}") == limit


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("rpm:100/minute", Limit.per_minute("rpm", 100)),
        ("rpm:100/min", Limit.per_minute("rpm", 100)),
        ("tpm:10000/1m,burst=20000", Limit.per_minute("tpm", 10_000, 20_000)),
        ("tpm:10_000/minute", Limit.per_minute("tpm", 10_000)),
        (" rps : 5 / second ", Limit.per_second("rps", 5)),
        ("d:1000/day", Limit.per_day("d", 1000)),
        ("h:7/Hours", Limit.per_hour("h", 7)),
        ("r:10/30s,refill=5", Limit.custom("r", 10, 5, 30)),
        ("r:10/90", Limit.custom("r", 10, 10, 90)),
        ("name=rpm,capacity=100,period=60,burst=120", Limit.per_minute("rpm", 100, 120)),
        ("limit=rpm,capacity=100,refill-period=1h", Limit.per_hour("rpm", 100)),
        ("name=x,capacity=4,refill_amount=2,refill_period_seconds=2", Limit.custom("x", 4, 2, 2)),
    ],
)
def test_parse(text: str, limit: Limit) -> None:
    assert Limit.parse(text) == limit


def test_spec_is_the_canonical_text() -> None:
    assert Limit.per_minute("rpm", 100).spec == "rpm:100/minute"
    assert Limit.per_minute("tpm", 1000, 2000).spec == "tpm:1000/minute,burst=2000"
    assert Limit.custom("r", 10, 5, 30).spec == "r:10/30s,refill=5"
    assert Limit.custom("r", 10, 10, 7200).spec == "r:10/7200s"
    assert Limit.per_day("d", 1).spec == "d:1/day"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("", "limit"),
        (",", "limit"),
        ("rpm", "limit"),
        ("rpm:100", "limit"),
        ("rpm/100", "limit"),
        ("rpm:100/minute,colour=red", "limit"),
        ("rpm:100/minute,burst", "limit"),
        ("rpm:x/minute", "capacity"),
        ("rpm:+5/minute", "capacity"),
        ("rpm:-5/minute", "capacity"),
        ("rpm:1.5/minute", "capacity"),
        ("rpm:0/minute", "capacity"),
        ("rpm:" + "9" * 5000 + "/minute", "capacity"),
        ("rpm:/minute", "capacity"),
        ("rpm:100/fortnight", "refill_period_seconds"),
        ("rpm:100/", "refill_period_seconds"),
        ("rpm:100/0s", "refill_period_seconds"),
        ("rpm:100/-1", "refill_period_seconds"),
        ("rpm:100/" + "9" * 30, "refill_period_seconds"),
        ("rpm:100/minute,burst=50", "burst"),
        ("rpm:100/minute,burst=many", "burst"),
        ("rpm:100/minute,refill=0", "refill_amount"),
        ("rpm:100/minute,period=5", "refill_period_seconds"),
        ("name=rpm,capacity=1", "refill_period_seconds"),
        ("capacity=1,period=60", "name"),
        ("9rpm:100/minute", "name"),
        ("rp#m:100/minute", "name"),
        (":100/minute", "name"),
    ],
)
def test_bad_text_names_the_field(text: str, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Limit.parse(text)
    assert caught.value.field == field, caught.value
    assert str(caught.value).startswith(f"Invalid {field}:")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("value", [None, 100, b"rpm:1/s"])
def test_parse_wants_a_string(value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        Limit.parse(value)  # type: ignore[arg-type]
    assert caught.value.field == "limit"


@given(st.text(max_size=40))
def test_parse_never_fails_with_anything_but_a_validation_error(text: str) -> None:
    try:
        limit = Limit.parse(text)
    except ValidationError:
        return
    assert Limit.parse(limit.spec) == limit


@pytest.mark.parametrize(
    "encoded", ["", "1:1:1", "1:1:1:1:1", "01:1:1:1", "1:1:1:1s", "a:b:c:d", " 1:1:1:1", "1:0:1:1"]
)
def test_decode_is_strict(encoded: str) -> None:
    with pytest.raises(ValidationError):
        Limit.decode(encoded, "rpm")


PLAN_FORMS = [
    ("tpm:1000/minute,soft", "tpm:1000/minute,soft"),
    ("monthly:10000/quota,cron=0 0 1 * *,tz=Europe/Paris",
     "monthly:10000/quota,cron=0 0 1 * *,tz=Europe/Paris"),
    ("twice:5/quota,cron=0 0 1,15 * *", "twice:5/quota,cron=0 0 1,15 * *,tz=UTC"),
    ("weekdays:5/quota,cron=0 9 * * mon-fri,soft",
     "weekdays:5/quota,cron=0 9 * * mon-fri,tz=UTC,soft"),
    ("session:50/quota,reset_after=5h", "session:50/quota,reset_after=18000s"),
    ("streams:5/concurrent", "streams:5/concurrent,lease_ttl=300s"),
    ("streams:5/concurrency,lease-ttl=1m,soft=true", "streams:5/concurrent,lease_ttl=60s,soft"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "spec"), PLAN_FORMS)
def test_plan_forms_round_trip(text: str, spec: str) -> None:
    limit = Limit.parse(text)
    assert limit.spec == spec
    assert Limit.parse(limit.spec) == limit
    assert Limit.decode(limit.encode(), limit.name) == limit
    assert Limit.from_dict(limit.to_dict()) == limit


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("q:5/quota", "cron"),
        ("q:5/quota,cron=0 0 * * *,reset_after=1h", "cron"),
        ("q:5/quota,cron=0 0 31 2 *", "cron"),
        ("q:5/quota,cron=0 0 * * *,tz=Mars/Base", "tz"),
        ("q:5/quota,cron=0 0 * * *,burst=6", "burst"),
        ("c:5/concurrent,cron=0 0 * * *", "cron"),
        ("r:5/minute,lease_ttl=1m", "lease_ttl_seconds"),
        ("r:5/minute,soft=maybe", "soft"),
    ],
)
def test_bad_plan_forms_name_their_field(text: str, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Limit.parse(text)
    assert info.value.field == field
