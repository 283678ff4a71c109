"""The bucket calls' own transport: GetItem and UpdateItem of bucket items, without botocore's
per-call machinery.

A bucket call through aiobotocore spent about three quarters of the client's CPU per acquire in
botocore's layers (event hooks, serializer, endpoint ruleset, signer, parser), not on the wire.
The request arguments are already DynamoDB's low-level JSON, so `LeanTransport` writes the body
with `json.dumps`, signs it with Signature Version 4 (`sigv4_headers`) and sends it through the
botocore client's own HTTP session (`AIOHTTPSession.send`): the same connection pool, TLS and
proxy settings, connect and read timeouts, and the same mapping of aiohttp's failures onto
botocore's exceptions (`EndpointConnectionError`, `ConnectTimeoutError`, `ReadTimeoutError`,
`ConnectionClosedError`, ...), which `TableClient.send` (client.py) classifies as before.

What is taken from the client, once, so that nothing is configured twice: the endpoint (botocore's
own resolution: `endpoint_url`, `AWS_ENDPOINT_URL*`, the region's public endpoint), the signing
region and name, and the credentials provider (read before every request: refreshable
credentials refresh as they do in botocore). A response is what botocore returns: a plain item
body is the JSON itself (`codec.plain_item_body`), anything else (an error, a binary value)
goes through the client's own parser, with the modeled error fields added and the error class
from the client's exceptions, as in aiobotocore's `_make_api_call`.

Every other call stays on the client. When the client is set up in a way this transport does not
reproduce (retries of its own, another signature version, a signing region or name from the
endpoint rules, extra headers from them, an endpoint with a path or query), `LeanTransport.of`
returns None and the bucket calls stay on the client too.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("zae_limiter.transport")

TARGET_PREFIX = "DynamoDB_20120810."
CONTENT_TYPE = "application/x-amz-json-1.0"
ALGORITHM = "AWS4-HMAC-SHA256"
# Operations sent here: the bucket reads and writes (method name -> API name).
OPERATIONS: Mapping[str, str] = {"get_item": "GetItem", "update_item": "UpdateItem"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """SigV4's derived key (AWS docs, "Create a signed AWS API request", step 4)."""
    key = hmac.new(f"AWS4{secret_key}".encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _header_value(value: str) -> str:
    # SigV4 canonical form: trimmed, inner runs of spaces as one.
    return " ".join(value.split())


def canonical_request(
    method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
) -> tuple[str, str]:
    """SigV4's canonical request of `headers` (every one is signed) and its signed-headers list.
    `path` and `query` are taken as already canonical (the transport only sends to "/")."""
    lowered = sorted((name.lower(), _header_value(value)) for name, value in headers.items())
    signed = ";".join(name for name, _ in lowered)
    lines = "".join(f"{name}:{value}\n" for name, value in lowered)
    payload = hashlib.sha256(body).hexdigest()
    return f"{method}\n{path}\n{query}\n{lines}\n{signed}\n{payload}", signed


class Signer:
    """SigV4 for one region and service; the derived key is kept per (secret, day), so a
    request costs two hashes and one HMAC."""

    def __init__(self, region: str, service: str) -> None:
        self.region = region
        self.service = service
        self._key: tuple[str, str, bytes] | None = None

    def _key_for(self, secret_key: str, date: str) -> bytes:
        cached = self._key
        if cached is not None and cached[0] == secret_key and cached[1] == date:
            return cached[2]
        key = signing_key(secret_key, date, self.region, self.service)
        self._key = (secret_key, date, key)
        return key

    def authorization(
        self,
        credentials: Credentials,
        amz_date: str,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> str:
        """The Authorization header for a request whose `headers` (Host and X-Amz-Date included,
        and X-Amz-Security-Token when there is a session token) are all signed."""
        date = amz_date[:8]
        scope = f"{date}/{self.region}/{self.service}/aws4_request"
        request, signed = canonical_request(method, path, query, headers, body)
        to_sign = (
            f"{ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(request.encode()).hexdigest()}"
        )
        signature = hmac.new(
            self._key_for(credentials.secret_key, date), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        return (
            f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )


def amz_date(epoch: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch))


def host_header(url: str) -> str:
    """What goes in Host for `url`: the host, and the port unless it is the scheme's default
    (as botocore signs it and aiohttp sends it)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


class _Request:
    """What `AIOHTTPSession.send` reads of botocore's prepared request."""

    __slots__ = ("body", "headers", "method", "stream_output", "url")

    def __init__(self, url: str, headers: dict[str, str], body: bytes) -> None:
        self.url = url
        self.method = "POST"
        self.headers = headers
        self.body = body
        self.stream_output = False


class LeanTransport:
    """Sends the bucket GetItem and UpdateItem of one botocore (aiobotocore) DynamoDB client."""

    def __init__(
        self,
        client: Any,
        endpoint_url: str,
        region: str,
        service: str,
        user_agent: str,
        plain_body: Callable[[bytes, str], dict[str, Any] | None],
    ) -> None:
        self._client = client
        self.http_session = client._endpoint.http_session
        self._parser_factory = client._endpoint._response_parser_factory
        self._service_model = client.meta.service_model
        self._credentials = client._request_signer._credentials
        self.url = endpoint_url
        self.host = host_header(endpoint_url)
        self.signer = Signer(region, service)
        self._user_agent = user_agent
        self._plain_body = plain_body
        self._date: tuple[int, str] = (-1, "")
        # The name of the operation's output shape, for `plain_body`.
        self._outputs = {
            api: self._service_model.operation_model(api).output_shape.name
            for api in OPERATIONS.values()
        }

    @classmethod
    async def of(
        cls,
        client: Any,
        table_name: str,
        plain_body: Callable[[bytes, str], dict[str, Any] | None],
    ) -> LeanTransport | None:
        """The transport for `client`'s bucket calls, or None when the client is set up in a
        way this transport does not reproduce (see the module's docstring)."""
        try:
            signer = client._request_signer
            if signer._signature_version != "v4" or signer._credentials is None:
                return None
            # One send per call, as the repository configures the client (its own loop
            # retries): a client that retries itself is not reproduced.
            if (client.meta.config.retries or {}).get("total_max_attempts") != 1:
                return None
            region, service = signer.region_name, signer._signing_name
            endpoint_url: str | None = None
            for api in OPERATIONS.values():
                model = client.meta.service_model.operation_model(api)
                context: dict[str, Any] = {
                    "client_region": client.meta.region_name,
                    "client_config": client.meta.config,
                    "has_streaming_input": False,
                    "auth_type": model.resolved_auth_type,
                    "unsigned_payload": model.unsigned_payload,
                    "auth_options": client.meta.service_model.metadata.get("auth"),
                }
                # botocore's own resolution, as it does for every call (a table name, not an
                # ARN: the same for every request of this repository).
                url, headers, _ = await client._resolve_endpoint_ruleset(
                    model, {"TableName": table_name}, context
                )
                signing = context.get("signing", {})
                if (
                    headers
                    or context.get("auth_type") not in (None, "v4")
                    or signing.get("region", region) != region
                    or signing.get("signing_name", service) != service
                    or (endpoint_url is not None and url != endpoint_url)
                ):
                    return None
                endpoint_url = str(url)
            if endpoint_url is None:
                return None
            parts = urlsplit(endpoint_url)
            if parts.path not in ("", "/") or parts.query or parts.scheme not in _DEFAULT_PORTS:
                return None
            user_agent = client.meta.config.user_agent  # the client's own, as it sends it
            return cls(client, endpoint_url, region, service, user_agent, plain_body)
        except Exception:
            # Another aiobotocore layout, or the endpoint rules failing now (say, credentials
            # that cannot be refreshed yet): the client keeps the bucket calls, and a failure
            # surfaces on a call, classified as it always was.
            log.debug("bucket calls stay on the botocore client", exc_info=True)
            return None

    async def credentials(self) -> Credentials | None:
        frozen = self._credentials.get_frozen_credentials()
        if inspect.isawaitable(frozen):
            frozen = await frozen
        if frozen is None or frozen.access_key is None or frozen.secret_key is None:
            return None
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token or None)

    def _amz_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, amz_date(now))
        return self._date[1]

    def headers(self, api: str, body: bytes, credentials: Credentials) -> dict[str, str]:
        """The request's headers, signed."""
        headers = {
            "Host": self.host,
            "X-Amz-Date": self._amz_date(),
            "X-Amz-Target": TARGET_PREFIX + api,
            "Content-Type": CONTENT_TYPE,
        }
        if credentials.token is not None:
            headers["X-Amz-Security-Token"] = credentials.token
        authorization = self.signer.authorization(
            credentials, headers["X-Amz-Date"], "POST", "/", "", headers, body
        )
        headers["Authorization"] = authorization
        headers["User-Agent"] = self._user_agent  # not signed (as botocore does not)
        return headers

    async def send(self, operation: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """One call of `operation` ("get_item", "update_item"): the response as botocore returns
        it, or botocore's exception for the same failure."""
        api = OPERATIONS[operation]
        credentials = await self.credentials()
        if credentials is None:
            import botocore.exceptions

            raise botocore.exceptions.NoCredentialsError()
        body = json.dumps(kwargs, separators=(",", ":")).encode()
        request = _Request(self.url, self.headers(api, body, credentials), body)
        response = await self.http_session.send(request)
        status = response.status_code
        content = await response.content
        if status < 300:
            parsed = self._plain_body(content, self._outputs[api])
            if parsed is not None:
                return parsed
        return await self._parse(api, response, content)

    async def _parse(self, api: str, response: Any, content: bytes) -> dict[str, Any]:
        """The client's own parse of a response (and its exception for an error), as
        aiobotocore's endpoint and `_make_api_call` make them."""
        model = self._service_model.operation_model(api)
        response_dict = {
            "headers": response.headers,
            "status_code": response.status_code,
            "context": {"operation_name": api},
            "body": content,
        }
        parser = self._parser_factory.create_parser("json")
        parsed: dict[str, Any] = await parser.parse(response_dict, model.output_shape)
        if "ResponseMetadata" in parsed:
            # What botocore's retry handler records of the one attempt the client makes.
            parsed["ResponseMetadata"]["MaxAttemptsReached"] = True
            parsed["ResponseMetadata"]["RetryAttempts"] = 0
        if response.status_code < 300:
            return parsed
        code = parsed.get("Error", {}).get("Code")
        if code is not None:
            shape = self._service_model.shape_for_error_code(code)
            if shape is not None:
                parsed.update(await parser.parse(response_dict, shape))
        raise self._client.exceptions.from_code(code)(parsed, api)
