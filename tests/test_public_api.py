"""The public surface: `__all__` is exactly what docs/api.md documents, and the sync twin offers
every public method and keyword of the async limiter with the same defaults."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import zae_limiter
from zae_limiter import Lease, RateLimiter, SyncLease, SyncRateLimiter

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def documented_names() -> set[str]:
    return set(re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)` \|", API_DOC.read_text(), re.M))


def test_all_is_exactly_the_documented_surface() -> None:
    assert set(zae_limiter.__all__) == documented_names()
    assert len(zae_limiter.__all__) == len(set(zae_limiter.__all__))


def test_every_exported_name_resolves_and_belongs_to_the_package() -> None:
    for name in zae_limiter.__all__:
        value = getattr(zae_limiter, name)
        module = getattr(value, "__module__", "zae_limiter")
        assert module.startswith("zae_limiter"), (name, module)


def public_members(cls: type) -> dict[str, object]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_")
    }


def test_sync_limiter_offers_every_method_of_the_async_one_with_the_same_signature() -> None:
    async_members = public_members(RateLimiter)
    sync_members = public_members(SyncRateLimiter)
    missing = sorted(set(async_members) - set(sync_members))
    assert not missing, f"SyncRateLimiter lacks {missing}"
    for name, member in async_members.items():
        twin = sync_members[name]
        if isinstance(member, property):
            assert isinstance(twin, property), name
            continue
        assert callable(member) and callable(twin), name
        expected = inspect.signature(member)
        actual = inspect.signature(twin)
        assert list(actual.parameters) == list(expected.parameters), name
        for param in expected.parameters.values():
            other = actual.parameters[param.name]
            assert (other.kind, other.default) == (param.kind, param.default), (name, param.name)


def test_sync_constructor_takes_every_keyword_of_the_async_one_with_the_same_defaults() -> None:
    expected = inspect.signature(RateLimiter.__init__).parameters
    actual = inspect.signature(SyncRateLimiter.__init__).parameters
    assert list(actual) == list(expected)
    for name, param in expected.items():
        assert (actual[name].kind, actual[name].default) == (param.kind, param.default), name


def test_sync_lease_offers_every_public_member_of_the_lease() -> None:
    assert set(public_members(Lease)) <= set(public_members(SyncLease))
    for name in ("adjust", "consume", "release"):
        assert inspect.signature(getattr(SyncLease, name)) == inspect.signature(
            getattr(Lease, name)
        )


def test_the_http_modules_document_and_type_every_public_callable() -> None:
    """`zae_limiter.asgi`, `.fastapi` and `.ratelimit_fields` are imported by their own names
    (docs/api.md): each public function and class of theirs has a docstring, and each public
    function annotates every parameter and its return."""
    import zae_limiter.asgi
    import zae_limiter.fastapi
    import zae_limiter.ratelimit_fields

    for module in (zae_limiter.asgi, zae_limiter.fastapi, zae_limiter.ratelimit_fields):
        for name in module.__all__:
            value = getattr(module, name)
            if not (inspect.isfunction(value) or inspect.isclass(value)):
                continue
            assert inspect.getdoc(value), f"{module.__name__}.{name} has no docstring"
            if inspect.isfunction(value):
                signature = inspect.signature(value)
                assert signature.return_annotation is not inspect.Signature.empty, name
                for param in signature.parameters.values():
                    assert param.annotation is not inspect.Parameter.empty, (name, param.name)
