"""Bad input: hypothesis-generated invalid arguments for every public method.

Each example makes exactly one argument invalid (wrong type, empty, too long, non-ASCII, `#`
separator, negative, huge, NaN, inf, float, bool, None, ...) and keeps the others valid. The call
must raise `ValidationError` (or `TypeError`) — never another exception — and must not reach
DynamoDB: the proxy in front of moto sees no request at all (validation happens before any I/O),
and the table holds the same items afterwards.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine, Iterator
from decimal import Decimal
from typing import Any

import pytest
from fault_proxy import FaultProxy
from figures import Figures, Size
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zae_limiter import FailureMode, Limit, RateLimiter, StackOptions, ValidationError
from zae_limiter.storage.dynamodb.repository import Repository

pytestmark = pytest.mark.integration

TABLE = "badinput"
LIMIT = Limit.per_minute("tok", 100)
ALLOWED = (ValidationError, TypeError)

# -- strategies: values that are invalid by construction ----------------------------------------

NON_STRINGS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.just(Decimal("1")),
    st.just(object()),
)
ASCII = st.text(alphabet=st.characters(min_codepoint=48, max_codepoint=122), max_size=12)


def _with(char_strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A short ASCII word with one offending character inserted somewhere."""
    return st.builds(
        lambda prefix, char, suffix: f"{prefix}{char}{suffix}", ASCII, char_strategy, ASCII
    )


def _too_long(limit: int) -> st.SearchStrategy[str]:
    return st.builds(lambda n: "a" * n, st.integers(limit + 1, limit + 300))


BAD_CHARS = st.one_of(
    st.just("#"),
    st.sampled_from([" ", "\n", "\t", "\x00", "*", "$", "%", "'", '"', "\\", "+", "é", "а"]),
    st.characters(min_codepoint=128),  # any non-ASCII character, emoji and surrogates included
)
BAD_IDS = st.one_of(
    NON_STRINGS,
    st.just(""),
    _with(BAD_CHARS),
    _too_long(256),
    st.builds(lambda s: "_" + s, ASCII),  # must start with a letter or digit
    st.builds(lambda s: "a" + s + "\n", ASCII),
)
BAD_RESOURCES = st.one_of(
    NON_STRINGS,
    st.just(""),
    _with(BAD_CHARS),
    _too_long(256),
    st.builds(lambda s: "1" + s, ASCII),  # must start with a letter
    st.builds(lambda s: "a" + s + "/", ASCII),
    st.builds(lambda s: "a//" + s, ASCII),
    st.just("_default"),
)
BAD_NAMES = st.one_of(
    NON_STRINGS,
    st.just(""),
    _with(st.one_of(BAD_CHARS, st.just("/"), st.just(":"))),
    _too_long(64),
    st.builds(lambda s: "9" + s, ASCII),
)
BAD_AMOUNTS = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=10**15 + 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.just(Decimal("1.5")),
    st.just(complex(1, 0)),
    st.just(math.nan),
)
BAD_SIGNED = st.one_of(
    st.integers(max_value=-(10**15) - 1),
    st.integers(min_value=10**15 + 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
)
BAD_LIMITS = st.one_of(
    st.just([]),
    st.just(LIMIT),  # a Limit, not a list of them
    st.just("tok"),
    st.just({"tok": LIMIT}),
    st.just([LIMIT, LIMIT]),  # duplicate names
    st.lists(NON_STRINGS, min_size=1, max_size=2),
    st.builds(lambda x: [LIMIT, x], NON_STRINGS),
    st.integers(),
)
BAD_CONSUME = st.one_of(
    NON_STRINGS.filter(lambda v: not isinstance(v, dict)),
    st.just([("tok", 1)]),
    st.builds(lambda a: {"tok": a}, BAD_AMOUNTS),
    st.builds(lambda n: {n: 1}, BAD_NAMES.filter(lambda v: isinstance(v, (str, int, float)))),
    st.just({"other": 1}),  # a name the limits do not have
    st.just({"tok": 101}),  # more than the burst: could never be admitted
)
BAD_METADATA = st.one_of(
    st.text(min_size=1, max_size=6),  # dict("ab") would raise a plain ValueError
    st.integers(),
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(st.integers(), st.text(max_size=3), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=3), NON_STRINGS, min_size=1, max_size=2),
)
BAD_MODES = st.one_of(st.sampled_from(["open", "closed", "FAIL_OPEN", 1, 0, True]), st.text())


# -- a limiter on its own event loop, behind the proxy ----------------------------------------


class Env:
    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.loop = asyncio.new_event_loop()
        self.limiter = RateLimiter(
            name=TABLE,
            endpoint_url=proxy.endpoint_url,
            stack_options=StackOptions(),
            failure_mode=FailureMode.FAIL_CLOSED,
        )
        self.run(self.limiter.__aenter__())
        self.run(self.limiter.create_entity("k"))
        self.run(self.limiter.create_entity("child", parent_id="k"))
        self.run(self.limiter.set_limits("k", [LIMIT], resource="api"))
        self.items_before = self.items()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def items(self) -> list[Any]:
        async def scan() -> list[Any]:
            host, port = self.proxy.upstream
            repo = Repository(TABLE, None, f"http://{host}:{port}")
            try:
                response = await repo.call("scan", TableName=repo.table_name)
            finally:
                await repo.close()
            return sorted(str(item) for item in response["Items"])

        return self.run(scan())

    def expect_rejected(self, call: Callable[[], Any]) -> None:
        """`call()` (a coroutine or a plain call) raises an allowed error before any I/O."""
        seen = len(self.proxy.requests())
        try:
            result = call()
            if asyncio.iscoroutine(result):
                self.run(result)
        except ALLOWED:
            pass
        else:
            pytest.fail("invalid input accepted")
        assert len(self.proxy.requests()) == seen, [
            s.op for s in self.proxy.requests()[seen:]
        ]

    def close(self) -> None:
        assert not self.proxy.writes()[self.writes_before :], "a write reached DynamoDB"
        assert self.items() == self.items_before, "the table changed"
        self.run(self.limiter.close())
        self.loop.close()

    def start(self) -> None:
        self.writes_before = len(self.proxy.writes())


@pytest.fixture
def env(proxy: FaultProxy) -> Iterator[Env]:
    e = Env(proxy)
    e.start()
    yield e
    e.close()


def fuzz(size: Size) -> Callable[[Any], Any]:
    return settings(
        max_examples=size.fuzz_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def acquire_call(limiter: RateLimiter, **kwargs: Any) -> Coroutine[Any, Any, None]:
    async def go() -> None:
        async with limiter.acquire(**kwargs):
            pytest.fail("admitted invalid input")

    return go()


VALID = {
    "entity_id": st.sampled_from(["k", "child", "key-1", "a.b:c@d"]),
    "resource": st.sampled_from(["api", "openai/gpt-4o", "_default_"]),
    "limits": st.just([LIMIT]),
    "consume": st.sampled_from([{"tok": 1}, {}, {"tok": 0}]),
}
ACQUIRE_BAD = {
    "entity_id": BAD_IDS,
    "resource": BAD_RESOURCES,
    "limits": BAD_LIMITS,
    "consume": BAD_CONSUME,
    "failure_mode": BAD_MODES,
}


@st.composite
def one_bad(draw: Any, bad: dict[str, Any], valid: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Valid arguments except one (which is named)."""
    field = draw(st.sampled_from(sorted(bad)))
    args = {name: draw(strategy) for name, strategy in valid.items()}
    args[field] = draw(bad[field])
    return field, args


# -- the tests ----------------------------------------------------------------------------------


def test_acquire_rejects_bad_input(env: Env, size: Size, figures: Figures) -> None:
    @fuzz(size)
    @given(case=one_bad(ACQUIRE_BAD, VALID), cascade=st.booleans())
    def check(case: tuple[str, dict[str, Any]], cascade: bool) -> None:
        _, args = case
        env.expect_rejected(lambda: acquire_call(env.limiter, cascade=cascade, **args))
        figures.inputs["acquire"] += 1

    check()


def test_reads_reject_bad_input(env: Env, size: Size, figures: Figures) -> None:
    valid = {k: VALID[k] for k in ("entity_id", "resource", "limits")}
    bad = {"entity_id": BAD_IDS, "resource": BAD_RESOURCES, "limits": BAD_LIMITS}
    needed_bad = dict(bad, needed=BAD_CONSUME)

    @fuzz(size)
    @given(
        available=one_bad(bad, valid),
        until=one_bad(needed_bad, dict(valid, needed=VALID["consume"])),
    )
    def check(available: tuple[str, dict[str, Any]], until: tuple[str, dict[str, Any]]) -> None:
        env.expect_rejected(lambda: env.limiter.available(**available[1]))
        env.expect_rejected(lambda: env.limiter.time_until_available(**until[1]))
        figures.inputs["available"] += 1
        figures.inputs["time_until_available"] += 1

    check()


def test_entity_methods_reject_bad_input(env: Env, size: Size, figures: Figures) -> None:
    create_valid = {
        "entity_id": st.sampled_from(["new-1", "new.2"]),
        "name": st.one_of(st.none(), st.text(max_size=10)),
        "parent_id": st.sampled_from([None, "k"]),
        "metadata": st.one_of(st.none(), st.just({"a": "b"})),
    }
    create_bad = {
        "entity_id": BAD_IDS,
        "name": NON_STRINGS.filter(lambda v: v is not None),
        "parent_id": BAD_IDS.filter(lambda v: v is not None),
        "metadata": BAD_METADATA,
    }

    @fuzz(size)
    @given(create=one_bad(create_bad, create_valid), bad_id=BAD_IDS)
    def check(create: tuple[str, dict[str, Any]], bad_id: Any) -> None:
        env.expect_rejected(lambda: env.limiter.create_entity(**create[1]))
        env.expect_rejected(lambda: env.limiter.get_entity(bad_id))
        env.expect_rejected(lambda: env.limiter.delete_entity(bad_id))
        env.expect_rejected(lambda: env.limiter.get_children(bad_id))
        for method in ("create_entity", "get_entity", "delete_entity", "get_children"):
            figures.inputs[method] += 1

    check()
    # An entity cannot be its own parent.
    env.expect_rejected(lambda: env.limiter.create_entity("self", parent_id="self"))


def test_stored_limit_methods_reject_bad_input(env: Env, size: Size, figures: Figures) -> None:
    valid = {
        "entity_id": VALID["entity_id"],
        "resource": VALID["resource"],
        "limits": VALID["limits"],
    }
    bad = {"entity_id": BAD_IDS, "resource": BAD_RESOURCES, "limits": BAD_LIMITS}
    key_valid = {k: valid[k] for k in ("entity_id", "resource")}
    key_bad = {k: bad[k] for k in ("entity_id", "resource")}

    @fuzz(size)
    @given(
        set_case=one_bad(bad, valid),
        get_case=one_bad(key_bad, key_valid),
        del_case=one_bad(key_bad, key_valid),
    )
    def check(set_case: Any, get_case: Any, del_case: Any) -> None:
        env.expect_rejected(lambda: env.limiter.set_limits(**set_case[1]))
        env.expect_rejected(lambda: env.limiter.get_limits(**get_case[1]))
        env.expect_rejected(lambda: env.limiter.delete_limits(**del_case[1]))
        for method in ("set_limits", "get_limits", "delete_limits"):
            figures.inputs[method] += 1

    check()


def test_lease_methods_reject_bad_input(env: Env, size: Size, figures: Figures) -> None:
    """On a live lease: a bad name or amount raises, writes nothing, and leaves the lease's books
    as they were; the lease still works afterwards (and its consumption is then written)."""
    acquired = env.limiter.acquire("k", "api", [LIMIT], {"tok": 2})
    lease = env.run(acquired.__aenter__())
    env.start()  # the acquire's own write is not under test
    env.items_before = env.items()

    @fuzz(size)
    @given(
        method=st.sampled_from(["adjust", "consume", "release"]),
        name=st.one_of(BAD_NAMES.filter(lambda v: isinstance(v, str)), st.just("other")),
        amount=st.one_of(BAD_AMOUNTS, BAD_SIGNED),
        bad_name=st.booleans(),
    )
    def check(method: str, name: str, amount: Any, bad_name: bool) -> None:
        call = getattr(lease, method)
        if bad_name:
            env.expect_rejected(lambda: call(**{name: 1}))
        elif method == "adjust" and isinstance(amount, int) and abs(amount) <= 10**15:
            return  # a valid signed amount
        else:
            env.expect_rejected(lambda: call(tok=amount))
        env.expect_rejected(lambda: call(**{"tok": 1, name: 1}))
        assert lease.consumed == {"tok": 2}
        figures.inputs[f"lease.{method}"] += 1

    check()
    env.expect_rejected(lambda: lease.adjust(**{"1": 1}))
    assert lease.consumed == {"tok": 2}
    env.run(acquired.__aexit__(None, None, None))  # a normal exit writes nothing


LIMIT_FIELDS = {
    "name": st.sampled_from(["rpm", "tpm", "tok"]),
    "capacity": st.integers(1, 1000),
    "burst": st.integers(1000, 2000),
    "refill_amount": st.integers(1, 1000),
    "refill_period_seconds": st.integers(1, 3600),
}
BAD_COUNTS = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=10**15 + 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.just(Decimal("10.5")),
)
LIMIT_BAD = {
    "name": BAD_NAMES,
    "capacity": BAD_COUNTS,
    "burst": st.one_of(BAD_COUNTS, st.integers(0, 0)),
    "refill_amount": BAD_COUNTS,
    "refill_period_seconds": st.one_of(BAD_COUNTS, st.integers(min_value=10 * 365 * 86400 + 1)),
}


def test_limit_constructors_reject_bad_input(size: Size, figures: Figures) -> None:
    @settings(max_examples=size.fuzz_examples * 3, deadline=None, database=None)
    @given(
        case=one_bad(LIMIT_BAD, LIMIT_FIELDS),
        helper=st.sampled_from(["per_second", "per_minute", "per_hour", "per_day"]),
        encoded=st.one_of(NON_STRINGS, st.text(max_size=20), st.just("1:2:3"), st.just("+1:1:1:1")),
        data=st.one_of(NON_STRINGS, st.dictionaries(st.text(max_size=5), st.integers())),
    )
    def check(case: Any, helper: str, encoded: Any, data: Any) -> None:
        args = case[1]
        with pytest.raises(ALLOWED):
            Limit(**args)
        with pytest.raises(ALLOWED):
            if case[0] == "burst":  # None means "the capacity": make it a bad one then
                Limit.custom(args["name"], 1000, 1, 1, burst=args["burst"])
                Limit.custom(args["name"], 0, 1, 1, burst=args["burst"])
            else:  # burst defaults to the (maybe bad) capacity
                Limit.custom(
                    args["name"], args["capacity"], args["refill_amount"],
                    args["refill_period_seconds"],
                )
        if case[0] in ("name", "capacity"):
            with pytest.raises(ALLOWED):
                getattr(Limit, helper)(args["name"], args["capacity"])
        with pytest.raises(ALLOWED):
            Limit.from_dict(dict(args))
        for method in ("Limit", "Limit.custom", "Limit.from_dict"):
            figures.inputs[method] += 1
        # Drawn freely, these may be valid: a rejection must be a clear error, an acceptance a
        # limit that reads back as what was given; only rejections count as bad inputs tried.
        try:
            decoded = Limit.decode(encoded, "tok")
        except ALLOWED:
            figures.inputs["Limit.decode"] += 1
        else:
            assert decoded.encode() == encoded, (encoded, decoded)
        try:
            loaded = Limit.from_dict(data)
        except ALLOWED:
            figures.inputs["Limit.from_dict (free)"] += 1
        else:
            assert Limit.from_dict(loaded.to_dict()) == loaded, (data, loaded)

    check()
