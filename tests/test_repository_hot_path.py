"""The cheaper bucket calls keep their behaviour (see benches/bench_calls.py for the CPU).

- The client is built with botocore's parameter validation off and a fixed User-Agent; every
  request but the bucket requests the repository builds itself is still checked by `call`.
- Bucket writes sent from parts built once per write shape are exactly the requests built from
  scratch (`bucket_update_request`), for any writes; the parts never leak between items, shapes
  or limit sets, and conditions still fail as they did.
- Item responses taken as plain JSON are exactly botocore's parse, for any item.
- The embedded server keeps connections alive and still applies one request at a time.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import http.client
import json
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import botocore.exceptions
import botocore.session
import botocore.validate
import pytest
from botocore.parsers import JSONParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zae_limiter import core, schema
from zae_limiter.ops.local import LocalDynamoDB
from zae_limiter.storage.dynamodb.codec import plain_item_body
from zae_limiter.storage.dynamodb.repository import Repository
from zae_limiter.storage.dynamodb.requests import PARTS_CACHE_SIZE, bucket_update_request
from zae_limiter.storage.protocol import ConditionFailed, LimitWrite, StorageError

NOW = 1_800_000_000_000


@pytest.fixture
async def repo(endpoint_url: str) -> AsyncIterator[Repository]:
    async with Repository(name="hot", endpoint_url=endpoint_url) as r:
        await r.create_table()
        yield r


def _create(name: str, full_at: int, definition: str = "1:1:1:1") -> LimitWrite:
    """The first write of a limit: absolute, must not exist yet."""
    return LimitWrite(name, core.WRITE_ABSOLUTE, full_at, None, None, 0, definition, create=True)


def _take(
    name: str, milli: int, lo: int | None = None, hi: int | None = None
) -> LimitWrite:
    """A relative write consuming `milli` (a millitoken is one tick of the `1:1:1:1` limit),
    under `lo <= full_at <= hi`."""
    return LimitWrite(name, core.WRITE_RELATIVE, milli, lo, hi, milli)


def _sent(repo_client: Any) -> list[Any]:
    """Requests the client sends from now on (botocore's `before-send`)."""
    seen: list[Any] = []

    def record(request: Any, **_: Any) -> None:
        seen.append(request)

    repo_client.meta.events.register("before-send.dynamodb", record)
    return seen


def _sent_lean(repo: Repository) -> list[Any]:
    """Requests the bucket calls' transport sends from now on (through the client's HTTP
    session, below botocore's events)."""
    assert repo.table_client.lean is not None
    seen: list[Any] = []
    http = repo.table_client.lean.http_session
    send = http.send

    async def record(request: Any) -> Any:
        seen.append(request)
        return await send(request)

    http.send = record
    return seen


# -- the client -------------------------------------------------------------------------------


async def test_client_skips_validation_and_rebuilding_the_user_agent(repo: Repository) -> None:
    client = await repo.client()
    # (botocore leaves `meta.config.parameter_validation` at its default; the serializer tells)
    assert not isinstance(client._serializer, botocore.validate.ParamValidationDecorator)
    assert client.meta.config.user_agent.startswith("zae-limiter/")
    sent = _sent(client)
    # Sent as it is, unchecked: the table refuses it.
    with pytest.raises(botocore.exceptions.ClientError):
        await client.get_item(TableName=repo.table_name, Key={schema.PK: {"S": 5}})
    assert len(sent) == 1
    sent.clear()
    lean = _sent_lean(repo)
    await repo.write_bucket("e", "r", [_create("rpm", 5_000)], NOW)
    assert await repo.get_bucket("e", "r") is not None
    # The bucket calls leave botocore's request path (transport.py) with the same User-Agent.
    assert sent == []
    assert [r.headers["User-Agent"] for r in lean] == [client.meta.config.user_agent] * 2


async def test_call_still_refuses_invalid_parameters_before_sending(repo: Repository) -> None:
    sent = _sent(await repo.client())
    bad: list[dict[str, Any]] = [
        {"TableName": repo.table_name},  # no Key
        {"TableName": repo.table_name, "Key": {schema.PK: {"S": 5}}},  # not a string
        {"TableName": repo.table_name, "Key": {}, "ConsistentRead": "yes"},
    ]
    for params in bad:
        with pytest.raises(StorageError) as info:
            await repo.call("get_item", **params)
        assert info.value.code == "ParamValidationError"
    assert sent == []
    # A valid request still reaches the table, whose own refusals are unchanged.
    with pytest.raises(StorageError) as refused:
        await repo.call("get_item", TableName=repo.table_name, Key={schema.PK: {"S": "x"}})
    assert refused.value.code == "ValidationException"
    assert len(sent) == 1


async def test_bad_bucket_input_is_refused_by_the_table(repo: Repository) -> None:
    """The bucket requests are not checked by botocore: what the library's own validation would
    not stop (it stops names and amounts before any I/O) DynamoDB still refuses."""
    with pytest.raises(StorageError) as info:
        await repo.write_bucket("e" * 3_000, "r", [_create("rpm", 1)], NOW)  # key too long
    assert info.value.code == "ValidationException"


# -- bucket requests from parts built once ----------------------------------------------------

LIMIT_NAMES = st.sampled_from(["rpm", "tpm", "rpd", "limit0", "x"])
MILLI = st.integers(min_value=-(2**62), max_value=2**62)
LEVEL = st.integers(min_value=-(10**38) + 1, max_value=10**38 - 1)
ANCHOR = st.integers(min_value=0, max_value=2**62)
MODES = st.sampled_from([core.WRITE_RELATIVE, core.WRITE_ABSOLUTE, core.WRITE_ADD])


@st.composite
def limit_write(draw: st.DrawFn, name: str) -> LimitWrite:
    kind = draw(st.sampled_from(["plain", "create", "legacy", "fenced"]))
    legacy = (draw(MILLI), draw(ANCHOR)) if kind in ("legacy", "fenced") else None
    return LimitWrite(
        limit_name=name,
        mode=draw(MODES),
        value=draw(LEVEL),
        cond_lo=draw(st.none() | LEVEL),
        cond_hi=draw(st.none() | LEVEL),
        delta_milli=draw(st.just(0) | MILLI),
        definition=draw(st.none() | st.sampled_from(["1:1:1:1", "100:120:100:60"])),
        create=kind == "create",
        legacy=legacy,
        fence=(draw(MILLI), draw(ANCHOR)) if kind == "fenced" else None,
    )


@st.composite
def bucket_write(draw: st.DrawFn) -> tuple[str, str, list[LimitWrite], int, str, int | None]:
    names = draw(st.lists(LIMIT_NAMES, min_size=1, max_size=4, unique=True))
    writes = [draw(limit_write(name)) for name in names]
    entity = draw(st.sampled_from(["a", "b", "tenant-1"]))
    resource = draw(st.sampled_from(["llm", "api", schema.DEFAULT_RESOURCE]))
    write_id = draw(st.text("abcdefgh0123456789-_", min_size=8, max_size=8))
    expires_at = draw(st.none() | st.integers(min_value=0, max_value=253_402_300_799))
    return entity, resource, writes, draw(ANCHOR), write_id, expires_at


# One repository for every example: its parts, built by earlier examples, are reused by later.
SHARED = Repository(name="shapes")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(bucket_write(), min_size=1, max_size=6))
def test_bucket_requests_are_the_requests_built_from_scratch(
    batch: list[tuple[str, str, list[LimitWrite], int, str, int | None]],
) -> None:
    built = [SHARED.requests.update(*args) for args in batch]
    for args, request in zip(batch, built, strict=True):
        assert request == bucket_update_request(SHARED.table_name, *args)
    # Requests of one shape share their parts; building another never changed them.
    for args, request in zip(batch, built, strict=True):
        assert request == bucket_update_request(SHARED.table_name, *args)
        assert json.dumps(request)  # plain JSON data, as botocore serializes it


def test_parts_are_kept_within_a_bound() -> None:
    repo = Repository(name="bound")
    for i in range(3_000):
        repo.requests.update(f"e{i}", "r", [_take(f"l{i % 1_500}", 1)], NOW, "id")
    assert len(repo.requests.keys) <= PARTS_CACHE_SIZE
    assert len(repo.requests.shapes) <= PARTS_CACHE_SIZE
    request = repo.requests.update("e1", "r", [_take("l1", 1)], NOW, "id")
    assert request == bucket_update_request(repo.table_name, "e1", "r", [_take("l1", 1)], NOW, "id")


async def test_parts_do_not_leak_between_items_and_limit_sets(repo: Repository) -> None:
    """Two entities x two resources, each with its own limit set, written in turns: every item
    holds exactly its own limits, values and names."""
    sets = {
        ("alice", "llm"): ["rpm", "tpm"],
        ("alice", "api"): ["rpm"],
        ("bob", "llm"): ["tpm", "rpd", "rpm"],
        ("bob", "api"): ["rpd"],
    }
    base = {item: 1_000_000 * (i + 1) for i, item in enumerate(sets)}
    for (entity, resource), names in sets.items():
        await repo.write_bucket(
            entity, resource, [_create(n, base[entity, resource]) for n in names], NOW
        )
    taken: dict[tuple[str, str], int] = dict.fromkeys(sets, 0)
    for round_ in range(1, 6):
        for (entity, resource), names in sets.items():
            milli = 1_000 * round_ * (len(names) + (entity == "bob"))
            written = await repo.write_bucket(
                entity, resource, [_take(n, milli) for n in names], NOW
            )
            taken[entity, resource] += milli
            assert (written.entity_id, written.resource) == (entity, resource)
            assert sorted(written.limits) == sorted(names)
    for (entity, resource), names in sets.items():
        bucket = await repo.get_bucket(entity, resource)
        assert bucket is not None and sorted(bucket.limits) == sorted(names)
        for name in names:
            state = bucket.limits[name]
            assert state.full_at == base[entity, resource] + taken[entity, resource]
            assert state.consumed_milli == taken[entity, resource]
            assert state.definition == "1:1:1:1"
        (raw,) = await repo.bucket_items(entity, resource)
        assert raw["entity_id"] == {"S": entity} and raw["resource"] == {"S": resource}
        others = {n for n in ("rpm", "tpm", "rpd") if n not in names}
        assert not any(schema.parse_limit_attr(a) and a.split("#")[1] in others for a in raw)


async def test_shared_parts_are_never_modified(repo: Repository) -> None:
    await repo.write_bucket("e", "r", [_create("rpm", 10_000)], NOW)
    first = repo.requests.update("e", "r", [_take("rpm", 1)], NOW, "id1")
    names, key = copy.deepcopy(first["ExpressionAttributeNames"]), copy.deepcopy(first["Key"])
    for _ in range(3):
        await repo.write_bucket("e", "r", [_take("rpm", 1)], NOW)
        await repo.get_bucket("e", "r")
    again = repo.requests.update("e", "r", [_take("rpm", 1)], NOW, "id2")
    assert again["ExpressionAttributeNames"] is first["ExpressionAttributeNames"]
    assert again["Key"] is first["Key"]
    assert again["ExpressionAttributeNames"] == names and again["Key"] == key


async def test_conditions_still_fail(repo: Repository) -> None:
    created = await repo.write_bucket("e", "r", [_create("rpm", 10_000)], NOW)
    assert created.limits["rpm"].full_at == 10_000
    legacy = LimitWrite("rpm", core.WRITE_ABSOLUTE, 7, None, None, 0, legacy=(5, 6), fence=(1, 2))
    refused = [
        [_create("rpm", 5_000)],  # exists already
        [_take("rpm", 1_000, lo=10_001)],  # full at the writer's now (below its lower bound)
        [_take("rpm", 1_000, hi=9_999)],  # not enough tokens (above its upper bound)
        [_take("rpm", 1_000, lo=0), _take("tpm", 1_000, lo=0)],  # tpm does not exist
        [legacy],  # not in the 1.x layout
    ]
    for writes in refused:
        with pytest.raises(ConditionFailed) as info:
            await repo.write_bucket("e", "r", writes, NOW)
        current = info.value.current
        assert current is not None and current.limits["rpm"].full_at == 10_000
    assert repo.ledger.conflicts == len(refused)
    # The same shapes, now holding: applied.
    assert (
        await repo.write_bucket("e", "r", [_take("rpm", 1_000, lo=10_000, hi=10_000)], NOW)
    ).limits["rpm"].full_at == 11_000
    give_back = LimitWrite("rpm", core.WRITE_ADD, -500, None, None, -500)
    after = await repo.write_bucket("e", "r", [give_back], NOW)
    assert after.limits["rpm"].full_at == 10_500 and after.limits["rpm"].released_milli == 500


async def test_a_write_id_applies_once(repo: Repository) -> None:
    """The ring of write ids still refuses a resend (what resolves a lost response)."""
    await repo.write_bucket("e", "r", [_create("rpm", 10_000)], NOW)
    request = repo.requests.update("e", "r", [_take("rpm", 1_000)], NOW, "resend01")
    await repo.table_client.send("update_item", request)
    with pytest.raises(StorageError) as info:
        await repo.table_client.send("update_item", request)
    assert info.value.code == "ConditionalCheckFailedException"
    bucket = await repo.get_bucket("e", "r")
    assert bucket is not None and bucket.limits["rpm"].full_at == 11_000
    assert bucket.write_ids[0] == "resend01"


# -- responses taken as plain JSON ------------------------------------------------------------

MODEL = botocore.session.get_session().get_service_model("dynamodb")
PLAIN_TAGS = ["S", "N", "SS", "NS", "NULL", "BOOL"]


def attribute_values(plain: bool) -> st.SearchStrategy[dict[str, Any]]:
    text = st.text(max_size=8)
    scalars = [
        st.builds(lambda s: {"S": s}, text),
        st.builds(lambda n: {"N": str(n)}, st.integers()),
        st.builds(lambda ss: {"SS": ss}, st.lists(text, min_size=1, max_size=3)),
        st.builds(lambda ns: {"NS": [str(n) for n in ns]}, st.lists(st.integers(), min_size=1)),
        st.just({"NULL": True}),
        st.builds(lambda b: {"BOOL": b}, st.booleans()),
    ]
    if not plain:
        scalars += [
            st.builds(lambda b: {"B": base64.b64encode(b).decode()}, st.binary(max_size=6)),
            st.builds(
                lambda bs: {"BS": [base64.b64encode(b).decode() for b in bs]},
                st.lists(st.binary(max_size=4), min_size=1, max_size=2),
            ),
            st.builds(lambda s: {"S": s, "Unknown": 1}, text),  # a member botocore drops
            st.just({"S": None}),  # a null botocore drops
        ]
    return st.recursive(
        st.one_of(scalars),
        lambda inner: st.builds(lambda m: {"M": m}, st.dictionaries(text, inner, max_size=3))
        | st.builds(lambda items: {"L": items}, st.lists(inner, max_size=3)),
        max_leaves=8,
    )


UNITS = st.fixed_dictionaries(
    {}, optional={"CapacityUnits": st.floats(0, 100), "ReadCapacityUnits": st.integers(0, 9)}
)
CAPACITY = st.fixed_dictionaries(
    {"TableName": st.just("ZAEL-t")},
    optional={
        "CapacityUnits": st.just(0.5) | st.just(1),
        "WriteCapacityUnits": st.just(1.0),
        "Table": UNITS,
        "GlobalSecondaryIndexes": st.dictionaries(st.just("gsi1"), UNITS),
        "LocalSecondaryIndexes": st.dictionaries(st.just("lsi1"), UNITS),
    },
)
# What botocore's parse changes or drops: an unknown member, a member of another type.
ODD_CAPACITY = CAPACITY.map(lambda c: {**c, "Unknown": 1}) | st.just({"CapacityUnits": "1"})


def _botocore_parse(body: bytes, output: str) -> Any:
    shape = MODEL.shape_for(output)
    return JSONParser()._handle_json_body(body, shape)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([("GetItemOutput", "Item"), ("UpdateItemOutput", "Attributes")]),
    st.booleans(),
    st.data(),
)
def test_plain_items_are_botocores_parse(
    output: tuple[str, str], plain: bool, data: st.DataObject
) -> None:
    shape_name, member = output
    item = data.draw(st.dictionaries(st.text(max_size=6), attribute_values(plain), max_size=6))
    response: dict[str, Any] = {member: item}
    capacity = data.draw(st.none() | CAPACITY | (st.nothing() if plain else ODD_CAPACITY))
    if capacity is not None:  # moto's server returns it unasked
        response["ConsumedCapacity"] = capacity
    body = json.dumps(response).encode()
    fast = plain_item_body(body, shape_name)
    expected = _botocore_parse(body, shape_name)
    # Taken as it is whenever nothing in it looks like a binary or a null (a string "B" or
    # "null" is enough to leave an item to botocore); and never different from botocore's.
    conservative = any(token in body for token in (b'"B"', b'"BS"', b"null"))
    if plain and not conservative:
        assert fast == expected
    else:
        assert fast is None or fast == expected


def test_other_outputs_and_members_are_left_to_botocore() -> None:
    item = {"PK": {"S": "ENTITY#e"}, "tk#rpm": {"N": "1"}}
    assert plain_item_body(json.dumps({"Item": item}).encode(), "GetItemOutput") == {"Item": item}
    with_capacity = {"Item": item, "ConsumedCapacity": {"CapacityUnits": 1}}
    assert plain_item_body(json.dumps(with_capacity).encode(), "GetItemOutput") == with_capacity
    odd = {"Item": item, "ConsumedCapacity": {"CapacityUnits": 1, "Unknown": 2}}
    assert plain_item_body(json.dumps(odd).encode(), "GetItemOutput") is None
    assert plain_item_body(json.dumps({"Item": item, "Other": 1}).encode(), "GetItemOutput") is None
    assert plain_item_body(json.dumps({"Items": [item]}).encode(), "QueryOutput") is None
    assert plain_item_body(b"", "GetItemOutput") is None
    assert plain_item_body(b"{}", "GetItemOutput") == {}
    assert plain_item_body(b"not json", "GetItemOutput") is None
    assert plain_item_body(b'{"Item": {"b": {"B": "AA=="}}}', "GetItemOutput") is None


async def test_the_client_parses_items_plainly_and_returns_the_same(repo: Repository) -> None:
    await repo.client()
    assert repo.table_client.parses_items_plainly
    await repo.write_bucket("e", "r", [_create("rpm", 10_000)], NOW)
    (raw,) = await repo.bucket_items("e", "r")
    binary = await repo.call(
        "put_item", TableName=repo.table_name, Item={**raw, "blob": {"B": b"\x00\xff"}}
    )
    assert binary["ResponseMetadata"]["HTTPStatusCode"] == 200
    (stored,) = await repo.bucket_items("e", "r")
    assert stored["blob"] == {"B": b"\x00\xff"}  # botocore decoded it, as before
    assert {k: v for k, v in stored.items() if k != "blob"} == raw


# -- the embedded server keeps connections alive, one request at a time ------------------------


def _list_tables(conn: http.client.HTTPConnection, close: bool = False) -> http.client.HTTPResponse:
    headers = {
        "X-Amz-Target": "DynamoDB_20120810.ListTables",
        "Content-Type": "application/x-amz-json-1.0",
        "Authorization": "AWS4-HMAC-SHA256 Credential=local/20200101/us-east-1/dynamodb/"
        "aws4_request, SignedHeaders=host, Signature=0",
    }
    if close:
        headers["Connection"] = "close"
    conn.request("POST", "/", body=b"{}", headers=headers)
    response = conn.getresponse()
    assert response.status == 200 and "TableNames" in json.loads(response.read())
    return response


@pytest.fixture
def closing_server() -> Iterator[LocalDynamoDB]:
    with LocalDynamoDB(keep_alive=False) as server:
        yield server


def test_connections_are_kept_alive(moto_server: LocalDynamoDB) -> None:
    conn = http.client.HTTPConnection(moto_server.host, moto_server.port, timeout=10)
    try:
        _list_tables(conn)
        sock = conn.sock
        for _ in range(3):
            response = _list_tables(conn)
            assert conn.sock is sock is not None  # the same connection
            assert response.getheader("Connection") is None
            assert response.getheader("Content-Length") is not None
        # The client asks to close: answered, then closed.
        assert _list_tables(conn, close=True).getheader("Connection") == "close"
        assert conn.sock is None
    finally:
        conn.close()


def test_the_server_can_close_every_connection(closing_server: LocalDynamoDB) -> None:
    conn = http.client.HTTPConnection(closing_server.host, closing_server.port, timeout=10)
    try:
        assert _list_tables(conn).getheader("Connection") == "close"
        assert conn.sock is None
    finally:
        conn.close()


def test_pipelined_and_chunked_requests_are_framed(moto_server: LocalDynamoDB) -> None:
    """Two requests sent at once on one connection get two answers; a chunked body (which
    cannot be framed ahead) is answered and the connection closed."""
    head = (
        "POST / HTTP/1.1\r\nHost: local\r\nX-Amz-Target: DynamoDB_20120810.ListTables\r\n"
        "Content-Type: application/x-amz-json-1.0\r\n"
        "Authorization: AWS4-HMAC-SHA256 Credential=local/20200101/us-east-1/dynamodb/"
        "aws4_request, SignedHeaders=host, Signature=0\r\n"
    )
    with socket.create_connection((moto_server.host, moto_server.port), timeout=10) as sock:
        one = (head + "Content-Length: 2\r\n\r\n{}").encode()
        chunked = (head + "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n").encode()
        sock.sendall(one + one + chunked)
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break  # closed by the server after the chunked request
            received += data
    assert received.count(b"HTTP/1.1 200 OK") == 3
    assert received.count(b'{"TableNames": [') == 3


async def test_kept_alive_connections_still_apply_one_request_at_a_time(
    endpoint_url: str,
) -> None:
    """Many clients, many connections, concurrent increments of one item: none lost."""
    clients, per_client = 4, 50
    repos = [Repository(name="serial", endpoint_url=endpoint_url) for _ in range(clients)]
    try:
        await repos[0].create_table()
        key = {schema.PK: {"S": "ENTITY#counter"}, schema.SK: {"S": "#BUCKET#r"}}

        async def increment(repo: Repository) -> None:
            await repo.call(
                "update_item",
                TableName=repo.table_name,
                Key=key,
                UpdateExpression="SET n = if_not_exists(n, :zero) + :one",
                ExpressionAttributeValues={":zero": {"N": "0"}, ":one": {"N": "1"}},
            )

        await asyncio.gather(*(increment(r) for r in repos for _ in range(per_client)))
        item = await repos[0].call(
            "get_item", TableName=repos[0].table_name, Key=key, ConsistentRead=True
        )
        assert item["Item"]["n"] == {"N": str(clients * per_client)}
    finally:
        for repo in repos:
            await repo.close()
