"""The bucket calls' own transport (`zae_limiter.transport`) signs, addresses and answers as
botocore does.

- The signature: AWS's published SigV4 examples (the derived key of the IAM example, the
  `get-vanilla` and `post-vanilla` requests of the SigV4 test suite), and every request the
  transport sends re-signed by botocore's `SigV4Auth` (same credentials, instant and headers),
  with and without a session token, with refreshed credentials.
- The answers: for the same HTTP response (a canned server), the transport returns or raises
  exactly what the botocore client does (class, code, message, modeled fields such as the
  `Item` of a failed condition, HTTP status), and a transport failure is the same exception.
- The endpoint: botocore's own resolution (argument, `AWS_ENDPOINT_URL`, the region's).
- The repository's bucket calls take this path; everything else stays on the client.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aioboto3
import botocore.auth
import botocore.exceptions
import pytest
from aiobotocore.credentials import AioRefreshableCredentials
from aiohttp import web
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from zae_limiter import core
from zae_limiter.storage.dynamodb.client import never_sent
from zae_limiter.storage.dynamodb.repository import Repository
from zae_limiter.storage.dynamodb.transport import (
    TARGET_PREFIX,
    Credentials,
    LeanTransport,
    Signer,
    host_header,
    signing_key,
)
from zae_limiter.storage.protocol import LimitWrite

NOW = 1_800_000_000_000
# AWS's example credentials (SigV4 documentation and test suite).
AKID = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


# -- the signature against AWS's published examples ---------------------------------------------


def test_signing_key_of_the_aws_docs_example() -> None:
    # "Examples of how to derive a signing key for Signature Version 4" (IAM, 20120215).
    key = signing_key(SECRET, "20120215", "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


@pytest.mark.parametrize(
    ("method", "signature"),
    [
        ("GET", "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
        ("POST", "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
    ],
)
def test_the_sigv4_test_suite_vanilla_requests(method: str, signature: str) -> None:
    headers = {"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z"}
    auth = Signer("us-east-1", "service").authorization(
        Credentials(AKID, SECRET), "20150830T123600Z", method, "/", "", headers, b""
    )
    assert auth == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        f"SignedHeaders=host;x-amz-date, Signature={signature}"
    )


def test_the_derived_key_follows_the_secret_and_the_day() -> None:
    signer = Signer("eu-west-1", "dynamodb")
    headers = {"Host": "h", "X-Amz-Date": "20260101T000000Z"}
    one = signer.authorization(Credentials("A", "s1"), "20260101T000000Z", "POST", "/", "",
                               headers, b"{}")
    other_secret = signer.authorization(Credentials("A", "s2"), "20260101T000000Z", "POST", "/",
                                        "", headers, b"{}")
    next_day = signer.authorization(Credentials("A", "s1"), "20260102T000000Z", "POST", "/", "",
                                    {**headers, "X-Amz-Date": "20260102T000000Z"}, b"{}")
    again = signer.authorization(Credentials("A", "s1"), "20260101T000000Z", "POST", "/", "",
                                 headers, b"{}")
    assert len({one, other_secret, next_day}) == 3
    assert again == one


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://dynamodb.us-east-1.amazonaws.com", "dynamodb.us-east-1.amazonaws.com"),
        ("https://dynamodb.us-east-1.amazonaws.com:443", "dynamodb.us-east-1.amazonaws.com"),
        ("http://127.0.0.1:8000", "127.0.0.1:8000"),
        ("http://localhost:80", "localhost"),
        ("http://[::1]:8000", "[::1]:8000"),
    ],
)
def test_host_header_is_what_botocore_signs(url: str, host: str) -> None:
    assert host_header(url) == host
    assert botocore.auth._host_from_url(url) == host  # type: ignore[attr-defined]


# -- a canned DynamoDB ---------------------------------------------------------------------------


@dataclass
class Canned:
    """An HTTP server answering each request with the next queued (status, body, headers), or
    with a plain empty GetItem answer; it records what it received."""

    url: str = ""
    queue: list[tuple[int, bytes, dict[str, str]]] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((dict(request.headers), body))
        status, payload, headers = self.queue.pop(0) if self.queue else (200, b"{}", {})
        return web.Response(status=status, body=payload, headers={
            "x-amzn-RequestId": "REQ1", "Content-Type": "application/x-amz-json-1.0", **headers
        })


@pytest.fixture
async def canned() -> AsyncIterator[Canned]:
    server = Canned()
    app = web.Application()
    async def route(request: web.Request) -> web.Response:
        return await server.handle(request)  # looked up per request: a test may replace it

    app.router.add_post("/", route)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


def _session(token: str | None = None) -> aioboto3.Session:
    return aioboto3.Session(aws_access_key_id=AKID, aws_secret_access_key=SECRET,
                            aws_session_token=token, region_name="eu-west-2")


@pytest.fixture
async def repo(canned: Canned) -> AsyncIterator[Repository]:
    async with Repository(name="t", endpoint_url=canned.url, session=_session()) as r:
        await r.client()
        yield r


def _update(repo: Repository) -> dict[str, Any]:
    write = LimitWrite("rpm", core.WRITE_RELATIVE, 5, 0, None, 5)
    return repo.requests.update("e", "r", [write], NOW, "wid", None)


def _get(repo: Repository) -> dict[str, Any]:
    return repo.requests.get("e", "r")


def _resign(headers: dict[str, str], body: bytes, url: str, credentials: BotoCredentials,
            region: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """botocore's SigV4 Authorization for the request as received (its own instant and the
    headers the transport signs; Host from the URL, as botocore takes it)."""
    at = datetime.datetime.strptime(headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.UTC
    )
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: at)
    kept = {name: value for name, value in headers.items()
            if name.lower() in ("x-amz-target", "content-type", "user-agent")}
    request = AWSRequest(method="POST", url=url + "/", data=body, headers=kept)
    botocore.auth.SigV4Auth(credentials, "dynamodb", region).add_auth(request)
    return str(request.headers["Authorization"])


# -- what is sent --------------------------------------------------------------------------------


async def test_bucket_calls_take_the_transport_and_botocore_signs_them_alike(
    canned: Canned, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert repo.table_client.lean is not None
    canned.queue.append((200, json.dumps({"Attributes": {"fa#rpm": {"N": "5"}}}).encode(), {}))
    await repo.table_client.send("update_item", _update(repo), bucket=True)
    await repo.table_client.send("get_item", _get(repo), bucket=True)
    assert len(canned.received) == 2
    for (headers, body), api in zip(canned.received, ("UpdateItem", "GetItem"), strict=True):
        assert headers["X-Amz-Target"] == TARGET_PREFIX + api
        assert headers["Content-Type"] == "application/x-amz-json-1.0"
        assert headers["Host"] == host_header(canned.url)
        assert "X-Amz-Security-Token" not in headers
        assert headers["Authorization"] == _resign(
            headers, body, canned.url, BotoCredentials(AKID, SECRET), "eu-west-2", monkeypatch
        )
        assert "SignedHeaders=content-type;host;x-amz-date;x-amz-target," in headers[
            "Authorization"]
    # The body is the request itself (DynamoDB's low-level JSON).
    assert json.loads(canned.received[0][1]) == json.loads(json.dumps(_update(repo)))


async def test_a_session_token_is_sent_and_signed(
    canned: Canned, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Repository(name="t", endpoint_url=canned.url,
                          session=_session(token="TOKEN/with+chars==")) as repo:
        await repo.table_client.send("get_item", _get(repo), bucket=True)
    ((headers, body),) = canned.received
    assert headers["X-Amz-Security-Token"] == "TOKEN/with+chars=="
    assert "x-amz-security-token;x-amz-target" in headers["Authorization"]
    assert headers["Authorization"] == _resign(
        headers, body, canned.url, BotoCredentials(AKID, SECRET, "TOKEN/with+chars=="),
        "eu-west-2", monkeypatch
    )


async def test_refreshed_credentials_sign_the_next_request(
    canned: Canned, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider is read before every request: credentials that refresh (an assumed role,
    SSO, instance metadata) sign with their new values, token included."""
    issued = iter(range(100))

    async def refresh() -> dict[str, str]:
        n = next(issued)
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1 if n else 0)
        return {"access_key": f"AK{n}", "secret_key": f"SK{n}", "token": f"TK{n}",
                "expiry_time": expiry.isoformat()}

    credentials = AioRefreshableCredentials.create_from_metadata(
        await refresh(), refresh, "test"
    )
    assert repo.table_client.lean is not None
    monkeypatch.setattr(repo.table_client.lean, "_credentials", credentials)
    await repo.table_client.send("get_item", _get(repo), bucket=True)
    await asyncio.sleep(1.1)  # past the expiry: botocore refreshes
    await repo.table_client.send("get_item", _get(repo), bucket=True)
    seen = []
    for headers, body in canned.received:
        access = headers["Authorization"].split("Credential=")[1].split("/")[0]
        n = access.removeprefix("AK")
        assert headers["X-Amz-Security-Token"] == f"TK{n}"
        assert headers["Authorization"] == _resign(
            headers, body, canned.url, BotoCredentials(f"AK{n}", f"SK{n}", f"TK{n}"),
            "eu-west-2", monkeypatch
        )
        seen.append(n)
    assert len(set(seen)) == 2


async def test_no_credentials_is_a_configuration_error_and_nothing_is_sent(
    canned: Canned, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert repo.table_client.lean is not None
    monkeypatch.setattr(repo.table_client.lean, "_credentials", BotoCredentials(None, None))  # type: ignore[arg-type]
    with pytest.raises(botocore.exceptions.NoCredentialsError):
        await repo.table_client.lean.send("get_item", _get(repo))
    assert canned.received == []


# -- what is answered ------------------------------------------------------------------------------

ITEM = {"PK": {"S": "ENTITY#e"}, "fa#rpm": {"N": "12"}, "w0": {"S": "x"}}
_ERROR_PREFIX = "com.amazonaws.dynamodb.v20120810#"
ANSWERS: list[tuple[str, int, bytes]] = [
    ("condition with item", 400, json.dumps({
        "__type": _ERROR_PREFIX + "ConditionalCheckFailedException",
        "message": "The conditional request failed", "Item": ITEM}).encode()),
    ("condition with binary item", 400, json.dumps({
        "__type": _ERROR_PREFIX + "ConditionalCheckFailedException",
        "message": "failed", "Item": {**ITEM, "b": {"B": "AP8="}}}).encode()),
    ("condition without item", 400, json.dumps({
        "__type": _ERROR_PREFIX + "ConditionalCheckFailedException", "message": "m"}).encode()),
    ("throttle", 400, json.dumps({
        "__type": _ERROR_PREFIX + "ProvisionedThroughputExceededException",
        "message": "slow down"}).encode()),
    ("throttling", 400, json.dumps({
        "__type": "com.amazon.coral.availability#ThrottlingException",
        "message": "Rate exceeded"}).encode()),
    ("validation, Message", 400, json.dumps({
        "__type": "com.amazon.coral.validate#ValidationException", "Message": "bad"}).encode()),
    ("code with a colon", 400, json.dumps({
        "__type": "ValidationException:http://internal.amazon.com/coral/",
        "message": "x"}).encode()),
    ("missing table", 400, json.dumps({
        "__type": _ERROR_PREFIX + "ResourceNotFoundException",
        "message": "Requested resource not found"}).encode()),
    ("access denied", 400, json.dumps({
        "__type": "com.amazon.coral.service#AccessDeniedException", "Message": "no"}).encode()),
    ("internal error", 500, json.dumps({
        "__type": "com.amazon.coral.service#InternalServerError", "message": "oops"}).encode()),
    ("503 json", 503, json.dumps({
        "__type": "com.amazon.coral.service#ServiceUnavailableException"}).encode()),
    ("500 empty", 500, b""),
    ("502 html", 502, b"<html><body>Bad Gateway</body></html>"),
    ("413 empty", 413, b""),
    ("400 not json", 400, b"not json"),
    ("200 not json", 200, b"not json"),
    ("200 empty", 200, b""),
    ("200 plain", 200, json.dumps({"Attributes": ITEM, "Item": ITEM}).encode()),
    ("200 binary", 200, json.dumps({"Attributes": {**ITEM, "b": {"B": "AP8="}},
                                    "Item": {**ITEM, "b": {"B": "AP8="}}}).encode()),
    ("200 capacity", 200, json.dumps({"Attributes": ITEM, "Item": ITEM, "ConsumedCapacity": {
        "TableName": "ZAEL-t", "CapacityUnits": 1.0}}).encode()),
    ("200 unknown member", 200, json.dumps({"Item": ITEM, "Attributes": ITEM,
                                            "Surprise": 1}).encode()),
]


def _comparable(outcome: Any) -> Any:
    """An outcome without what differs from one response to the next (the Date header) and
    without ResponseMetadata on success (the transport leaves it out of a plain item answer:
    nothing reads it)."""
    if isinstance(outcome, BaseException):
        response = json.loads(json.dumps(getattr(outcome, "response", {}), default=repr))
        response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).pop("date", None)
        return type(outcome), str(outcome), response
    return {k: v for k, v in outcome.items() if k != "ResponseMetadata"}


async def _outcome(call: Any) -> Any:
    try:
        return await call
    except Exception as exc:  # compared below, whatever it is
        return exc


@pytest.mark.parametrize(("answer", "status", "body"), ANSWERS, ids=[a[0] for a in ANSWERS])
@pytest.mark.parametrize("operation", ["update_item", "get_item"])
async def test_answers_are_the_clients(
    canned: Canned, repo: Repository, answer: str, status: int, body: bytes, operation: str
) -> None:
    client = await repo.client()
    assert repo.table_client.lean is not None
    kwargs = _update(repo) if operation == "update_item" else _get(repo)
    canned.queue.append((status, body, {}))
    expected = await _outcome(getattr(client, operation)(**kwargs))
    canned.queue.append((status, body, {}))
    got = await _outcome(repo.table_client.lean.send(operation, kwargs))
    assert _comparable(got) == _comparable(expected)
    if isinstance(expected, botocore.exceptions.ClientError):
        assert isinstance(got, botocore.exceptions.ClientError)
        assert got.response["ResponseMetadata"]["HTTPStatusCode"] == status
        assert got.response["Error"] == expected.response["Error"]
        assert got.response.get("Item") == expected.response.get("Item")


async def test_a_refused_connection_is_the_same_never_sent_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    async with Repository(name="t", endpoint_url=f"http://127.0.0.1:{port}",
                          session=_session()) as repo:
        client = await repo.client()
        assert repo.table_client.lean is not None
        expected = await _outcome(client.get_item(**_get(repo)))
        got = await _outcome(repo.table_client.lean.send("get_item", _get(repo)))
    assert type(got) is type(expected) is botocore.exceptions.EndpointConnectionError
    assert never_sent(got) and never_sent(expected)


async def test_a_read_timeout_is_the_same_error(canned: Canned) -> None:
    from zae_limiter.storage.dynamodb.client import RetryPolicy

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(body=b"{}")

    app = web.Application()
    app.router.add_post("/", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with Repository(name="t", endpoint_url=f"http://127.0.0.1:{port}",
                              session=_session(), retry=RetryPolicy(read_timeout=0.2)) as repo:
            client = await repo.client()
            assert repo.table_client.lean is not None
            expected = await _outcome(client.get_item(**_get(repo)))
            got = await _outcome(repo.table_client.lean.send("get_item", _get(repo)))
    finally:
        await runner.cleanup()
    assert type(got) is type(expected) is botocore.exceptions.ReadTimeoutError


# -- where it is sent ------------------------------------------------------------------------------


async def _lean_url(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> str | None:
    async with Repository(name="t", session=_session(), **kwargs) as repo:
        await repo.client()
        client_url = (await repo.client()).meta.endpoint_url
        lean = repo.table_client.lean
        assert lean is None or lean.url == client_url
        return None if lean is None else lean.url


async def test_the_endpoint_is_botocores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB", raising=False)
    assert await _lean_url(monkeypatch, region="ap-south-1") == (
        "https://dynamodb.ap-south-1.amazonaws.com"
    )
    assert await _lean_url(monkeypatch, endpoint_url="http://127.0.0.1:4566") == (
        "http://127.0.0.1:4566"
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://localhost:9999")
    assert await _lean_url(monkeypatch) == "http://localhost:9999"
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", "http://localhost:7777")
    assert await _lean_url(monkeypatch) == "http://localhost:7777"
    # An endpoint with a path: botocore's request path would differ; the client keeps the calls.
    assert await _lean_url(monkeypatch, endpoint_url="http://localhost:8000/prefix") is None


async def test_other_signing_setups_keep_the_client(canned: Canned) -> None:
    from botocore import UNSIGNED
    from botocore.config import Config

    once = {"total_max_attempts": 1, "mode": "standard"}
    session = _session()
    for config in (
        Config(signature_version=UNSIGNED, retries=once),
        Config(retries={"total_max_attempts": 3, "mode": "standard"}),  # would resend
    ):
        async with session.client("dynamodb", endpoint_url=canned.url, config=config) as client:
            assert await LeanTransport.of(client, "ZAEL-t", lambda body, output: None) is None
    async with session.client("dynamodb", endpoint_url=canned.url,
                              config=Config(retries=once)) as client:
        assert await LeanTransport.of(client, "ZAEL-t", lambda body, output: None) is not None


# -- the repository over it: the same classification ------------------------------------------


def _stored(fa: int, ids: tuple[str, ...]) -> dict[str, Any]:
    ring = {f"w{i}": {"S": ids[i] if i < len(ids) else ""} for i in range(4)}
    return {"PK": {"S": "ENTITY#e"}, "SK": {"S": "#BUCKET#r"}, "fa#rpm": {"N": str(fa)},
            "lm#rpm": {"S": "1:1:1:1"}, **ring}


def _error(code: str, **extra: Any) -> bytes:
    return json.dumps({"__type": _ERROR_PREFIX + code, "message": code, **extra}).encode()


async def test_a_throttled_bucket_write_is_counted_and_sent_again(
    canned: Canned, repo: Repository
) -> None:
    canned.queue.append((400, _error("ProvisionedThroughputExceededException"), {}))
    canned.queue.append((200, json.dumps({"Attributes": _stored(5, ("x",))}).encode(), {}))
    write = LimitWrite("rpm", core.WRITE_RELATIVE, 5, 0, None, 5)
    state = await repo.write_bucket("e", "r", [write], NOW)
    assert state.limits["rpm"] is not None and state.write_ids[0] == "x"
    assert repo.ledger.calls["update_item:throttled"] == 1
    assert len(canned.received) == 2
    assert canned.received[0][1] == canned.received[1][1]  # the same request, same write id


async def test_a_failed_condition_returns_the_item_sent_with_it(
    canned: Canned, repo: Repository
) -> None:
    from zae_limiter.storage.protocol import ConditionFailed

    canned.queue.append((400, _error("ConditionalCheckFailedException",
                                     Item=_stored(99, ("a", "b"))), {}))
    write = LimitWrite("rpm", core.WRITE_RELATIVE, 5, 0, 10, 5)
    with pytest.raises(ConditionFailed) as info:
        await repo.write_bucket("e", "r", [write], NOW)
    assert info.value.current is not None
    assert info.value.current.write_ids[:2] == ("a", "b")
    assert len(canned.received) == 1  # the item came with the refusal: no read


async def test_a_500_on_a_bucket_write_is_resolved_by_reading_the_item(
    canned: Canned, repo: Repository
) -> None:
    """An InternalServerError may have applied the write: the item is read (GetItem through
    the transport); its write id there means it landed, and nothing is sent again."""
    sent: list[str] = []
    write_ids: list[str] = []

    async def landed(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        api = request.headers["X-Amz-Target"].rsplit(".", 1)[1]
        sent.append(api)
        if api == "UpdateItem":
            values = body["ExpressionAttributeValues"]
            write_ids.append(values[body["ConditionExpression"].split("NOT (")[1].split()[0]]["S"])
            return web.Response(status=500, body=_error("InternalServerError"))
        return web.json_response({"Item": _stored(5, (write_ids[-1],))})

    canned.handle = landed  # type: ignore[method-assign]
    write = LimitWrite("rpm", core.WRITE_RELATIVE, 5, 0, None, 5)
    state = await repo.write_bucket("e", "r", [write], NOW)
    assert sent == ["UpdateItem", "GetItem"]
    assert state.write_ids[0] == write_ids[0]


async def test_a_failing_endpoint_resolution_keeps_the_client(
    canned: Canned, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Setting the transport up never fails the client: a failure there (credentials that
    cannot be refreshed yet, say) leaves the bucket calls on botocore, where it surfaces."""
    from botocore.config import Config

    once = Config(retries={"total_max_attempts": 1})
    async with _session().client("dynamodb", endpoint_url=canned.url, config=once) as client:

        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise botocore.exceptions.CredentialRetrievalError(provider="x", error_msg="down")

        monkeypatch.setattr(client, "_resolve_endpoint_ruleset", fail)
        assert await LeanTransport.of(client, "ZAEL-t", lambda body, output: None) is None
