"""Where DynamoDB is: the endpoint a client uses (`configured_endpoint`), a loopback endpoint (the
embedded server, DynamoDB Local) and what a client of one needs. Light on purpose: the embedded
server's process and the deadline's default read it without loading aioboto3."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from ... import schema

__all__ = [
    "ENDPOINT_VARIABLES",
    "LOCAL_CREDENTIALS",
    "LOCAL_REGION",
    "configured_endpoint",
    "is_loopback",
]

# A loopback endpoint (the embedded server, DynamoDB Local) with no credentials configured gets
# these: the server accepts any, and botocore then does not search the environment for real ones.
LOCAL_REGION = schema.DEFAULT_REGION
LOCAL_CREDENTIALS = {"aws_access_key_id": "local", "aws_secret_access_key": "local"}

# botocore's standard variables for DynamoDB's endpoint, the service's own first.
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_DYNAMODB", "AWS_ENDPOINT_URL")
# botocore's switch that makes it ignore those variables (and the config file's endpoints).
IGNORE_ENDPOINTS_VARIABLE = "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"


def configured_endpoint(
    endpoint_url: str | None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The DynamoDB endpoint a client talks to: `endpoint_url` when given, else the one named
    by botocore's standard variables (`AWS_ENDPOINT_URL_DYNAMODB`, then `AWS_ENDPOINT_URL`),
    unless `AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true`; None: the region's public endpoint.

    botocore sends requests there by itself; the library resolves it too so that a loopback
    endpoint named only by the environment (`export AWS_ENDPOINT_URL=...` after `zae-limiter
    local`) is treated as one given by argument: no region or credentials needed, the loopback
    deadline, and `StackOptions` creating the table there rather than deploying to AWS.
    (The `endpoint_url` of a profile in the config file is left to botocore.)"""
    if endpoint_url:
        return endpoint_url
    env = os.environ if environ is None else environ
    if env.get(IGNORE_ENDPOINTS_VARIABLE, "").strip().lower() == "true":
        return None
    for variable in ENDPOINT_VARIABLES:
        value = env.get(variable, "").strip()
        if value:
            return value
    return None


def is_loopback(endpoint_url: str | None) -> bool:
    """True for an endpoint on this host (localhost, 127.0.0.0/8, ::1): a local DynamoDB, which
    needs neither a region nor real credentials."""
    if not endpoint_url:
        return False
    try:
        host = urlsplit(endpoint_url if "//" in endpoint_url else f"//{endpoint_url}").hostname
    except ValueError:
        return False
    if host is None:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
