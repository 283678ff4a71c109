"""The API reference (docs/reference/, built by mkdocs + mkdocstrings) documents every public name:
each name of `zae_limiter.__all__` and each name docs/api.md lists is the target of a `:::`
directive or a member of one. A textual check of the pages, cheap enough for every run: a name
added to the surface without a place in the reference fails here (the strict build, `.ci/run`,
catches the rest: a directive whose target does not exist, a docstring griffe cannot parse)."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import zae_limiter

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "api.md"
REFERENCE = ROOT / "docs" / "reference"

# Modules docs/api.md names that the reference does not render as modules. The operator-level
# ones are stable for scripts but documented by their own pages and docstrings, not (yet) here;
# the others are the homes of classes the reference documents under their public names.
OPERATOR_MODULES = frozenset(
    {"zae_limiter.infra", "zae_limiter.aggregator", "zae_limiter.migrations", "zae_limiter.ops"}
)
HOME_OF = {"zae_limiter.storage.memory": "MemoryStorage", "zae_limiter.repository": "Repository"}


@dataclass(frozen=True)
class Directive:
    target: str
    page: str
    # A `members:` option restricts (or with `false` removes) the members rendered.
    restricts_members: bool


def directives(pages: dict[str, str]) -> list[Directive]:
    found = []
    for page, text in pages.items():
        lines = text.splitlines()
        for i, line in enumerate(lines):
            match = re.match(r"^::: *([A-Za-z_][\w.]*)\s*$", line)
            if not match:
                continue
            options = []
            for following in lines[i + 1 :]:
                if following.strip() and not following.startswith(" "):
                    break
                options.append(following)
            restricts = any(re.match(r"^\s+members:", option) for option in options)
            found.append(Directive(match.group(1), page, restricts))
    return found


def reference_pages() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(REFERENCE.glob("*.md"))}


def resolve(path: str) -> object:
    """The object at a dotted path: the longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            value = getattr(value, attribute)
        return value
    raise ModuleNotFoundError(path)


def documented_objects(found: list[Directive]) -> tuple[list[object], list[object]]:
    """What the directives render: their targets, and the members of each module rendered with
    its members (its `__all__`). Second, the classes rendered with all their public members."""
    objects: list[object] = []
    whole_classes: list[object] = []
    for directive in found:
        target = resolve(directive.target)
        objects.append(target)
        if directive.restricts_members:
            continue
        if isinstance(target, ModuleType):
            objects.extend(getattr(target, name) for name in getattr(target, "__all__", ()))
        elif isinstance(target, type):
            whole_classes.append(target)
    return objects, whole_classes


def is_in(value: object, objects: list[object]) -> bool:
    # By identity: strings and numbers (BACKEND, __version__) compare by the directive's name.
    return any(value is other for other in objects)


def undocumented_package_names(pages: dict[str, str]) -> list[str]:
    found = directives(pages)
    objects, _ = documented_objects(found)
    targets = {directive.target for directive in found}
    missing = []
    for name in zae_limiter.__all__:
        value = getattr(zae_limiter, name)
        if isinstance(value, (str, int, float)):
            if f"zae_limiter.{name}" not in targets:
                missing.append(name)
        elif not is_in(value, objects):
            missing.append(name)
    return missing


def api_doc_names() -> tuple[set[str], set[str], set[str]]:
    """docs/api.md's names: the tables' public names, the kill-switch table's methods (of both
    limiters) and the dotted paths it names."""
    text = API_DOC.read_text()
    names = set(re.findall(r"^\| `([A-Za-z_]\w*)` \|", text, re.M))
    methods = set(re.findall(r"(?:^\||/) `([a-z_]\w*)\(", text, re.M))
    dotted = set(re.findall(r"`(zae_limiter(?:\.[A-Za-z_]\w*)+)`", text)) - {
        "zae_limiter.__all__"
    }
    return names, methods, dotted


def test_every_name_of_all_is_in_the_reference() -> None:
    missing = undocumented_package_names(reference_pages())
    assert not missing, f"add to a page of docs/reference/ (`::: zae_limiter.<name>`): {missing}"


def test_the_check_sees_a_missing_directive() -> None:
    """The check above, on the pages with one directive removed, reports that name."""
    pages = reference_pages()
    assert "::: zae_limiter.Limit\n" in pages["models.md"]
    pages["models.md"] = pages["models.md"].replace("::: zae_limiter.Limit\n", "")
    assert undocumented_package_names(pages) == ["Limit"]
    pages["models.md"] = pages["models.md"].replace("::: zae_limiter.__version__", "")
    assert undocumented_package_names(pages) == ["Limit", "__version__"]


def test_every_name_docs_api_lists_is_in_the_reference() -> None:
    names, methods, dotted = api_doc_names()
    assert len(names) > 40 and len(methods) >= 9 and len(dotted) >= 10  # the parse found them
    found = directives(reference_pages())
    objects, whole_classes = documented_objects(found)
    targets = {directive.target for directive in found}

    missing = sorted(
        name
        for name in names
        if f"zae_limiter.{name}" not in targets
        and not is_in(getattr(zae_limiter, name), objects)
    )
    assert not missing, f"docs/api.md lists {missing}: none is on a reference page"

    limiters = [zae_limiter.RateLimiter, zae_limiter.SyncRateLimiter]
    assert all(is_in(cls, whole_classes) for cls in limiters), "the limiters' members"
    for method in methods:
        assert all(hasattr(cls, method) for cls in limiters), method

    for path in sorted(dotted - {"zae_limiter"}):
        if path in OPERATOR_MODULES:
            continue
        value = resolve(path)
        if path in HOME_OF:
            assert isinstance(value, ModuleType)
            cls = getattr(value, HOME_OF[path])
            assert cls is getattr(zae_limiter, HOME_OF[path]) and is_in(cls, objects), path
            continue
        assert is_in(value, objects), f"docs/api.md names `{path}`: not on a reference page"


def test_every_reference_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in reference_pages():
        assert f"reference/{page}" in nav, page
