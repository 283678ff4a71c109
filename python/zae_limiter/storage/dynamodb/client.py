"""One table's DynamoDB client (`TableClient`): the aioboto3 session and client's lifecycle, the
botocore parser that takes plain items as they come, what DynamoDB's errors mean (refused,
ambiguous, a configuration error), and the one loop that sends a request and retries it
(`TableClient.send`, under a `RetryPolicy`).

Errors leave it translated, so callers need no botocore: a missing table is
`InfrastructureNotFoundError`, an outage (unreachable, throttled past the retries, failing) is
`RepositoryUnavailable`, a refused condition `ConditionCheckFailed`, any other refusal
`StorageError` with DynamoDB's code (the `ClientError` is its `__cause__`). A failure after which
the request may or may not have been applied is `Ambiguous` unless the caller says it may be sent
again (`send`'s `resend`).
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aioboto3
import aiobotocore
import aiohttp
import botocore.exceptions
import botocore.validate
from aiobotocore.parsers import AioJSONParser, AioResponseParserFactory
from botocore.config import Config

from ..._version import __version__
from ...exceptions import InfrastructureNotFoundError
from ...schema import error_code
from ..capacity import CapacityLedger
from ..protocol import Item, RepositoryUnavailable, StorageError
from .codec import plain_item_body
from .endpoint import LOCAL_CREDENTIALS, LOCAL_REGION, is_loopback
from .transport import LeanTransport

__all__ = [
    "RETRYABLE_CODES",
    "THROTTLE_CODES",
    "Ambiguous",
    "ConditionCheckFailed",
    "Resend",
    "RetryPolicy",
    "TableClient",
    "idempotent",
    "is_throttle",
    "never_sent",
]

# Errors after which DynamoDB has certainly not applied the request.
RETRYABLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)
# Of those, the ones DynamoDB answers before it looks at the item (admission control): a
# refused give-back is resent only after one of these. A 503 (ServiceUnavailable) is retried
# blindly for other writes, where applying twice costs capacity at worst; an added give-back
# applied twice would mint tokens, and nothing guarantees a 503 was refused before applying.
THROTTLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "LimitExceededException",
    }
)
# The client cannot sign or address a request at all: a configuration error, never sent.
_CLIENT_SETUP_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.NoRegionError,
)
# Errors after which the request may or may not have been applied.
_AMBIGUOUS_CODES = frozenset({"InternalServerError", "InternalFailure"})
_SAFE_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
)
# The table (or, for backups, the table named in the request) does not exist.
_MISSING_TABLE_CODES = frozenset({"ResourceNotFoundException", "TableNotFoundException"})
_CONDITION_FAILED = "ConditionalCheckFailedException"


def is_throttle(exc: BaseException | None) -> bool:
    """Whether `exc` is DynamoDB refusing a request for throughput (`THROTTLE_CODES`)."""
    return isinstance(exc, botocore.exceptions.ClientError) and error_code(exc) in THROTTLE_CODES


def never_sent(exc: BaseException) -> bool:
    """Whether a connection error (`EndpointConnectionError`, `ConnectTimeoutError`) means that
    DynamoDB never saw the request. aiobotocore also reports a connection reset after the
    request was sent (a pooled connection dropped mid-response) as EndpointConnectionError:
    only a failure to connect means it was never sent."""
    if isinstance(exc, botocore.exceptions.ConnectTimeoutError):
        return True
    cause = getattr(exc, "kwargs", {}).get("error")
    return cause is None or isinstance(
        cause, (aiohttp.ClientConnectorError, ConnectionRefusedError)
    )


class ConditionCheckFailed(StorageError):
    """A conditional write was refused; `item` is what DynamoDB returned with the refusal
    (ReturnValuesOnConditionCheckFailure), if anything."""

    def __init__(self, message: str, item: Item | None) -> None:
        super().__init__(_CONDITION_FAILED, message)
        self.item = item


class Ambiguous(Exception):
    """The request may or may not have been applied (a lost response, a 5xx); `cause` is the
    failure."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


# Called by `TableClient.send` after an ambiguous failure (given the failure): returns to have
# the request sent again, raises to stop (the caller's own error, or `Ambiguous(cause)`).
Resend = Callable[[BaseException], Awaitable[None]]


async def idempotent(cause: BaseException) -> None:
    """`send`'s `resend` for a request whose effect is idempotent: always sent again."""


def _invalid(exc: botocore.exceptions.ParamValidationError) -> StorageError:
    return StorageError("ParamValidationError", str(exc))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries with full-jitter exponential backoff: `max_attempts` sends of one request
    in all, whatever failed.

    The defaults ride out a throttled item: DynamoDB refuses writes to an item (a partition)
    past its ceiling over about a second, so the backoff before the last attempt reaches a
    second (caps 0.1, 0.2, 0.4, 0.8, 1 s; about 1.25 s in all on average). Four attempts capped
    at 0.2 s gave up within about 0.2 s, and under a write ceiling that failed acquires and
    lost reservations' give-backs.

    A throttle is a certain refusal (nothing was applied) and says the item is busy, not broken,
    so a throttled request goes on past `max_attempts` until `throttle_seconds` have passed
    since its first send. Jittered retries are not fair: on an item held at its ceiling by
    several processes, six attempts lost to the others about once in a thousand acquires. The
    call's deadline (1 s against DynamoDB) still bounds what a caller waits.
    """

    max_attempts: int = 6
    base_delay: float = 0.05
    max_delay: float = 1.0
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    throttle_seconds: float = 10.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * (2 ** min(attempt, 16))))

    def retries_throttle(self, attempt: int, started: float) -> bool:
        """Whether a request throttled on its `attempt`-th send (0-based), first sent at
        `started` (monotonic seconds), is sent again."""
        if attempt + 1 < self.max_attempts:
            return True
        return time.monotonic() - started < self.throttle_seconds


# -- the parser: plain items as they come ------------------------------------------------------

# aiobotocore's stubs leave out the parts overridden here.
_JSONParser: Any = AioJSONParser
_ParserFactory: Any = AioResponseParserFactory


class _ItemJSONParser(_JSONParser):  # type: ignore[misc]
    def _handle_json_body(self, raw_body: bytes, shape: Any) -> Any:
        if shape is not None:
            parsed = plain_item_body(raw_body, shape.name)
            if parsed is not None:
                return parsed
        return super()._handle_json_body(raw_body, shape)


class _ItemParserFactory(_ParserFactory):  # type: ignore[misc]
    """aiobotocore's parser factory, whose JSON parser takes plain items as they come."""

    def create_parser(self, protocol_name: str) -> Any:
        if protocol_name == "json":
            return _ItemJSONParser(**self._defaults)
        return super().create_parser(protocol_name)


def _parse_items_plainly(client: Any) -> bool:
    """Give the client's endpoint `_ItemParserFactory` (with the factory's defaults), if it has
    aiobotocore's own factory where this version of aiobotocore keeps it; True if it did. On any
    other layout the client keeps parsing as it does: slower, never different."""
    endpoint = getattr(client, "_endpoint", None)
    factory = getattr(endpoint, "_response_parser_factory", None)
    if type(factory) is not AioResponseParserFactory:
        return False
    plain = _ItemParserFactory()
    plain.set_parser_defaults(**getattr(factory, "_defaults", {}))
    endpoint._response_parser_factory = plain  # type: ignore[union-attr]
    return True


# The User-Agent header, fixed: botocore otherwise rebuilds it (twice) for every request, with
# per-request feature metadata, one of the largest client costs of a call.
USER_AGENT = (
    f"zae-limiter/{__version__} aiobotocore/{aiobotocore.__version__} "
    f"Python/{platform.python_version()}"
)


class TableClient:
    """The DynamoDB client of one table: built on first use (`client`), closed by `close`;
    every request goes through `send` (or `call`, which checks it first)."""

    def __init__(
        self,
        table_name: str,
        region: str | None = None,
        endpoint_url: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        session: aioboto3.Session | None = None,
        max_pool_connections: int = 50,
        ledger: CapacityLedger | None = None,
    ) -> None:
        self.table_name = table_name
        self.region = region
        self.endpoint_url = endpoint_url
        self.retry = retry or RetryPolicy()
        self.ledger = ledger or CapacityLedger()
        self.session = session or aioboto3.Session()
        self.max_pool_connections = max_pool_connections
        # The bucket calls' transport (None: they go through the client; see `transport`).
        self.lean: LeanTransport | None = None
        self.parses_items_plainly = False  # see `_parse_items_plainly`
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        self._input_shapes: dict[str, Any] = {}

    async def open(self) -> None:
        """Build the client now. Loading botocore's service model costs a few hundred
        milliseconds of CPU once: the limiter does it before a deadline starts, which bounds
        the wait on DynamoDB, not this."""
        try:
            await self.client()
        except _CLIENT_SETUP_ERRORS as exc:
            raise StorageError(type(exc).__name__, str(exc)) from exc

    async def client(self) -> Any:
        """The aiobotocore client, built on first use."""
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                stack = contextlib.AsyncExitStack()
                client = await stack.enter_async_context(
                    self.session.client(
                        "dynamodb",
                        endpoint_url=self.endpoint_url,
                        config=self.config(),
                        **await self._where(),
                    )
                )
                self.parses_items_plainly = _parse_items_plainly(client)
                self.lean = await LeanTransport.of(client, self.table_name, plain_item_body)
                self._client, self._stack = client, stack
        return self._client

    def config(self) -> Config:
        """The client's configuration."""
        return Config(
            # `send` owns retries: botocore's would replay non-idempotent bucket writes after a
            # lost response and double them.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=self.retry.connect_timeout,
            read_timeout=self.retry.read_timeout,
            max_pool_connections=self.max_pool_connections,
            # Checking every request against the service model was the largest single cost of
            # a bucket write in botocore. The bucket requests are built from checked arguments
            # and need no check; every other request is checked by `call` itself.
            parameter_validation=False,
            user_agent=USER_AGENT,
        )

    async def _where(self) -> dict[str, Any]:
        """Region (and, if need be, credentials) of the client. A loopback endpoint (a local
        DynamoDB) needs neither: the region defaults to us-east-1 and, when botocore finds no
        credentials, placeholders are used. What the caller or the environment configured wins."""
        where: dict[str, Any] = {"region_name": self.region}
        if not is_loopback(self.endpoint_url):
            return where
        if self.region is None and self.session.region_name is None:
            where["region_name"] = LOCAL_REGION
        # aioboto3's Session.get_credentials returns aiobotocore's coroutine.
        if await self.session.get_credentials() is None:
            where.update(LOCAL_CREDENTIALS)
        return where

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        self.lean = None
        if stack is not None:
            await stack.aclose()

    # -- requests ---------------------------------------------------------------------------

    async def call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """One request whose effect is idempotent (ambiguous failures are simply sent again),
        checked against the service model first, as botocore's own parameter validation would
        (it is off in the client): arguments it refuses raise
        `StorageError("ParamValidationError", ...)` and nothing is sent."""
        await self._check(operation, kwargs)
        return await self.send(operation, kwargs, resend=idempotent)

    async def _check(self, operation: str, kwargs: Mapping[str, Any]) -> None:
        shape = self._input_shapes.get(operation)
        if shape is None:
            meta = (await self.client()).meta
            api = meta.method_to_api_mapping.get(operation)
            if api is None:
                return  # not an operation: the call fails as it always did
            shape = meta.service_model.operation_model(api).input_shape
            if shape is None:
                return
            self._input_shapes[operation] = shape
        try:
            botocore.validate.validate_parameters(kwargs, shape)
        except botocore.exceptions.ParamValidationError as exc:
            raise _invalid(exc) from exc

    async def send(
        self,
        operation: str,
        kwargs: Mapping[str, Any],
        retryable: frozenset[str] = RETRYABLE_CODES,
        *,
        bucket: bool = False,
        resend: Resend | None = None,
    ) -> dict[str, Any]:
        """One request (not checked: see `call`), sent until it is answered, at most
        `retry.max_attempts` times in all (a throttle: see `RetryPolicy.throttle_seconds`),
        with jittered backoff between sends.

        Sent again: a refusal that certainly applied nothing (`retryable` codes, a connection
        never made). An ambiguous failure (a lost response, a 5xx: it may have been applied;
        a `retryable` code this request excludes counts as one) is sent again only if `resend`
        returns for it; without `resend` it raises `Ambiguous`. A `bucket` call (the bucket
        GetItem and UpdateItem) goes through `transport.LeanTransport` when the client allows
        it; it raises botocore's exceptions, so what follows is the same for both."""
        try:
            client = await self.client()
        except _CLIENT_SETUP_ERRORS as exc:
            raise StorageError(type(exc).__name__, str(exc)) from exc
        lean = self.lean if bucket else None
        method: Callable[..., Awaitable[dict[str, Any]]] = getattr(client, operation)
        last: BaseException | None = None
        started = time.monotonic()
        attempt = -1
        while True:
            attempt += 1
            if attempt:
                if not (
                    attempt < self.retry.max_attempts
                    or (is_throttle(last) and self.retry.retries_throttle(attempt - 1, started))
                ):
                    break
                self.ledger.retried(operation)
                await asyncio.sleep(self.retry.delay(attempt))
            try:
                if lean is not None:
                    return await lean.send(operation, kwargs)
                return await method(**kwargs)
            except botocore.exceptions.ClientError as exc:
                code = error_code(exc) or ""
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
                if code in retryable:
                    self.ledger.throttled(operation)
                    last = exc
                    continue
                if not (code in _AMBIGUOUS_CODES or code in RETRYABLE_CODES or status >= 500):
                    raise self._translate(exc, code) from exc
                failure: BaseException = exc
            except botocore.exceptions.ParamValidationError as exc:
                # Refused before sending (`call` checks requests; botocore may still refuse
                # some itself): retrying cannot help.
                raise _invalid(exc) from exc
            except _CLIENT_SETUP_ERRORS as exc:
                # No credentials (or region) to sign with: nothing was sent, no retry helps.
                raise StorageError(type(exc).__name__, str(exc)) from exc
            except _SAFE_TRANSPORT_ERRORS as exc:
                if never_sent(exc):
                    last = exc
                    continue
                failure = exc
            except (TimeoutError, botocore.exceptions.BotoCoreError, OSError) as exc:
                failure = exc
            if resend is None:
                raise Ambiguous(failure) from failure
            await resend(failure)
            last = failure
        raise RepositoryUnavailable(
            f"DynamoDB {operation} failed after {attempt} attempts: {last}", last
        )

    def _translate(self, exc: botocore.exceptions.ClientError, code: str) -> Exception:
        message = str(exc.response.get("Error", {}).get("Message", "")) or str(exc)
        if code in _MISSING_TABLE_CODES:
            return InfrastructureNotFoundError(self.table_name)
        if code == _CONDITION_FAILED:
            return ConditionCheckFailed(message, exc.response.get("Item"))  # type: ignore[arg-type]
        return StorageError(code or "UnknownError", message)
