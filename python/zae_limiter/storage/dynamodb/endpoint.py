"""Where DynamoDB is: a loopback endpoint (the embedded server, DynamoDB Local) and what a client
of one needs. Light on purpose: the embedded server's process and the deadline's default read it
without loading aioboto3."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from ... import schema

__all__ = ["LOCAL_CREDENTIALS", "LOCAL_REGION", "is_loopback"]

# A loopback endpoint (the embedded server, DynamoDB Local) with no credentials configured gets
# these: the server accepts any, and botocore then does not search the environment for real ones.
LOCAL_REGION = schema.DEFAULT_REGION
LOCAL_CREDENTIALS = {"aws_access_key_id": "local", "aws_secret_access_key": "local"}


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
