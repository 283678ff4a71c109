"""Pure aggregator math: exact, idempotent and order-independent folding of stream records."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import random
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zae_limiter import schema
from zae_limiter.aggregator import snapshots as snap
from zae_limiter.aggregator.handler import (
    Settings,
    SnapshotTable,
    decode_spans,
    process_batch,
)
from zae_limiter.core import windows
from zae_limiter.models import UsageSnapshot
from zae_limiter.storage.dynamodb.codec import snapshot_from_item
from zae_limiter.storage.dynamodb.requests import usage_query
from zae_limiter.usage import summarize

HOUR_MS = 3_600_000
# 2024-03-31T22:00:00Z: two hours before a day (and month) boundary.
BASE_MS = int(datetime(2024, 3, 31, 22, tzinfo=UTC).timestamp() * 1000)
NOW = BASE_MS / 1000 + 10 * 3600


def clock() -> float:
    return NOW


# ---------------------------------------------------------------------------
# Record builders
# ---------------------------------------------------------------------------


def image(entity: str, resource: str, counters: dict[str, int], ts: int | None) -> dict[str, Any]:
    item: dict[str, Any] = {
        schema.PK: {"S": schema.entity_pk(entity)},
        schema.SK: {"S": schema.bucket_sk(resource)},
        "entity_id": {"S": entity},
        "resource": {"S": resource},
    }
    for attr, value in counters.items():
        item[attr] = {"N": str(value)}
    if ts is not None:
        item[schema.WRITE_TIME] = {"N": str(ts)}
    return item


def record(seq: int, entity: str, resource: str, old: dict[str, int] | None,
           new: dict[str, int] | None, ts: int | None, old_ts: int | None = None,
           event: str | None = None) -> dict[str, Any]:
    dynamodb: dict[str, Any] = {
        "Keys": {
            schema.PK: {"S": schema.entity_pk(entity)},
            schema.SK: {"S": schema.bucket_sk(resource)},
        },
        "SequenceNumber": str(10**20 + seq),
        "StreamViewType": "NEW_AND_OLD_IMAGES",
        "ApproximateCreationDateTime": NOW,
    }
    if new is not None:
        dynamodb["NewImage"] = image(entity, resource, new, ts)
    if old is not None:
        dynamodb["OldImage"] = image(entity, resource, old, old_ts)
    name = event or ("INSERT" if old is None else "MODIFY" if new is not None else "REMOVE")
    return {"eventID": f"e{seq}", "eventName": name, "eventSource": "aws:dynamodb",
            "dynamodb": dynamodb}


Step = tuple[int, int, int, int]  # (item index, consumed delta, released delta, ts offset ms)

ITEMS = (("e1", "gpt"), ("e1", "claude"), ("e2", "gpt"))
LIMITS = ("rpm", "tpm")


def chain(steps: Sequence[Step]) -> tuple[list[dict[str, Any]], dict[snap.SnapshotKey, dict[
        str, list[int]]]]:
    """Records of successive writes, and the exact expected (consumed, released) per snapshot."""
    state: dict[int, dict[str, int]] = {}
    records: list[dict[str, Any]] = []
    expected: dict[snap.SnapshotKey, dict[str, list[int]]] = {}
    for seq, (index, consumed, released, offset) in enumerate(steps):
        entity, resource = ITEMS[index % len(ITEMS)]
        limit = LIMITS[seq % len(LIMITS)]
        old = state.get(index)
        new = dict(old or {})
        new[f"cn#{limit}"] = new.get(f"cn#{limit}", 0) + consumed
        new[f"rl#{limit}"] = new.get(f"rl#{limit}", 0) + released
        ts = BASE_MS + offset
        records.append(record(seq, entity, resource, old, new, ts))
        state[index] = new
        for window in windows.WINDOWS:
            key = snap.SnapshotKey(entity, resource, window, windows.window_start(window, ts))
            per_limit = expected.setdefault(key, {}).setdefault(limit, [0, 0])
            per_limit[0] += consumed
            per_limit[1] += released
    return records, expected


def fold(records: Sequence[dict[str, Any]], windows: Sequence[str] = windows.WINDOWS
         ) -> dict[snap.SnapshotKey, snap.Growth]:
    out: dict[snap.SnapshotKey, snap.Growth] = {}
    for rec in records:
        change = snap.parse_record(rec, int(NOW * 1000))
        if isinstance(change, str):
            continue
        for key in change.snapshot_keys(windows):
            out[key] = snap.merge_growth(out.get(key, {}), change.growth)
    return {k: v for k, v in out.items() if v}


def as_totals(folded: dict[snap.SnapshotKey, snap.Growth]) -> dict[snap.SnapshotKey, dict[
        str, list[int]]]:
    return {
        key: {limit: [t.consumed_milli, t.released_milli]
              for limit, t in snap.totals(growth).items()}
        for key, growth in folded.items()
    }


def drop_zero(expected: dict[snap.SnapshotKey, dict[str, list[int]]]
              ) -> dict[snap.SnapshotKey, dict[str, list[int]]]:
    out = {key: {lim: v for lim, v in per.items() if v != [0, 0]} for key, per in expected.items()}
    return {key: per for key, per in out.items() if per}


steps_strategy = st.lists(
    st.tuples(
        st.integers(0, len(ITEMS) - 1),
        st.integers(0, 5000),
        st.integers(0, 2000),
        st.integers(0, 3 * HOUR_MS),  # spans the midnight boundary
    ),
    min_size=1,
    max_size=30,
)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(steps=steps_strategy, seed=st.integers(0, 2**32 - 1), monotone=st.booleans())
def test_fold_is_exact_idempotent_and_order_independent(steps: list[Step], seed: int,
                                                        monotone: bool) -> None:
    if monotone:
        offsets = sorted(s[3] for s in steps)
        steps = [(s[0], s[1], s[2], off) for s, off in zip(steps, offsets, strict=True)]
    records, expected = chain(steps)
    reference = fold(records)
    # Exact even when writers' clocks disagree (non-monotone ts across a boundary).
    assert as_totals(reference) == drop_zero(expected)

    rng = random.Random(seed)
    noisy = records + rng.sample(records, k=rng.randint(0, len(records)))
    rng.shuffle(noisy)
    assert fold(noisy) == reference

    # Folding in several deliveries (what stored snapshots see) gives the same state.
    split = rng.randint(0, len(noisy))
    first, second = fold(noisy[:split]), fold(noisy[split:])
    merged = {key: snap.merge_growth(first.get(key, {}), second.get(key, {}))
              for key in first.keys() | second.keys()}
    assert merged == reference


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 1000)), max_size=40))
def test_merge_spans_is_a_normalised_union(raw: list[tuple[int, int]]) -> None:
    spans = [(lo, lo + length) for lo, length in raw]
    merged = snap.merge_spans(spans)
    assert merged == snap.merge_spans(merged, spans)  # idempotent
    assert merged == snap.merge_spans(list(reversed(spans)))  # commutative
    assert all(a[1] < b[0] for a, b in itertools.pairwise(merged))  # disjoint, sorted
    assert len(merged) <= snap.MAX_SPANS
    if len(merged) < snap.MAX_SPANS:
        covered = set().union(*(range(lo, hi) for lo, hi in spans)) if spans else set()
        assert snap.span_total(merged) == len(covered)


# ---------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("ts", "hourly", "daily"),
    [
        (ms(2024, 3, 31, 23, 59, 59) + 999, "2024-03-31T23:00Z", "2024-03-31"),
        (ms(2024, 4, 1, 0, 0, 0), "2024-04-01T00:00Z", "2024-04-01"),
        (ms(2024, 2, 29, 12, 30), "2024-02-29T12:00Z", "2024-02-29"),
        (0, "1970-01-01T00:00Z", "1970-01-01"),
    ],
)
def test_window_start(ts: int, hourly: str, daily: str) -> None:
    assert windows.window_start("hourly", ts) == hourly
    assert windows.window_start("daily", ts) == daily
    assert windows.parse_window_start("hourly", hourly) <= datetime.fromtimestamp(ts / 1000, UTC)
    assert windows.window_end("daily", daily) > datetime.fromtimestamp(ts / 1000, UTC)


def test_parse_windows() -> None:
    assert windows.parse_windows("hourly, daily") == ("hourly", "daily")
    assert windows.parse_windows("daily,daily") == ("daily",)
    with pytest.raises(ValueError, match="unknown usage window"):
        windows.parse_windows("hourly,weekly")
    with pytest.raises(ValueError):
        windows.parse_windows(" , ")


def test_record_time_falls_back_to_stream_time() -> None:
    rec = record(1, "e1", "gpt", None, {"cn#rpm": 1000}, ts=None)
    rec["dynamodb"]["ApproximateCreationDateTime"] = ms(2024, 1, 1, 5, 30) / 1000
    change = snap.parse_record(rec, 0)
    assert isinstance(change, snap.BucketChange)
    assert change.ts_ms == ms(2024, 1, 1, 5, 30)


# ---------------------------------------------------------------------------
# Skips and poison
# ---------------------------------------------------------------------------


def test_resets_and_deletions_never_count() -> None:
    deleted = record(1, "e1", "gpt", {"cn#rpm": 9000}, None, ts=BASE_MS, old_ts=BASE_MS)
    assert snap.parse_record(deleted, 0) == "bucket deleted"
    overwritten = record(2, "e1", "gpt", {"cn#rpm": 9000, "rl#rpm": 10}, {"cn#rpm": 1000,
                         "rl#rpm": 50}, ts=BASE_MS)
    change = snap.parse_record(overwritten, 0)
    assert isinstance(change, snap.BucketChange)
    assert change.growth == {"rpm": {"rl": [(10, 50)]}}  # cn went down: nothing consumed
    bare = record(3, "e1", "gpt", None, {}, ts=BASE_MS)
    assert snap.parse_record(bare, 0) == "no counters"
    unchanged = record(4, "e1", "gpt", {"cn#rpm": 5}, {"cn#rpm": 5}, ts=BASE_MS)
    assert snap.parse_record(unchanged, 0) == "no counter growth"
    other = record(5, "e1", "gpt", None, {"cn#rpm": 5}, ts=BASE_MS)
    other["dynamodb"]["Keys"][schema.SK] = {"S": schema.limit_sk("gpt", "rpm")}
    assert snap.parse_record(other, 0) == "not a bucket item"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r["dynamodb"]["NewImage"].__setitem__("cn#rpm", {"S": "lots"}),
        lambda r: r["dynamodb"]["NewImage"].__setitem__("cn#rpm", {"N": "1.5"}),
        lambda r: r["dynamodb"]["NewImage"].__setitem__("ts", {"N": "-5"}),
        lambda r: r.pop("dynamodb"),
        lambda r: r["dynamodb"]["Keys"].pop(schema.PK),
    ],
)
def test_poison_records_raise(mutate: Any) -> None:
    rec = record(1, "e1", "gpt", None, {"cn#rpm": 1000}, ts=BASE_MS)
    mutate(rec)
    with pytest.raises(snap.PoisonRecordError):
        snap.parse_record(rec, 0)


# ---------------------------------------------------------------------------
# process_batch against an in-memory client
# ---------------------------------------------------------------------------


class ConditionFailed(Exception):
    def __init__(self) -> None:
        super().__init__("conditional check failed")
        self.response = {"Error": {"Code": "ConditionalCheckFailedException"}}


class FakeClient:
    """get_item/put_item with the two conditions the aggregator uses."""

    def __init__(self, race_on_put: int = 0, fail_for: str | None = None) -> None:
        self.items: dict[tuple[str, str], dict[str, Any]] = {}
        self.puts = 0
        self.race_on_put = race_on_put
        self.fail_for = fail_for

    @staticmethod
    def _key(key: dict[str, Any]) -> tuple[str, str]:
        return key[schema.PK]["S"], key[schema.SK]["S"]

    def get_item(self, TableName: str, Key: dict[str, Any], ConsistentRead: bool) -> dict[str, Any]:
        item = self.items.get(self._key(Key))
        return {"Item": json.loads(json.dumps(item))} if item else {}

    def put_item(self, TableName: str, Item: dict[str, Any], ConditionExpression: str,
                 ExpressionAttributeNames: dict[str, str],
                 ExpressionAttributeValues: dict[str, Any] | None = None) -> None:
        key = self._key(Item)
        if self.fail_for is not None and self.fail_for in key[0]:
            raise RuntimeError("throttled")
        self.puts += 1
        current = self.items.get(key)
        if self.race_on_put and self.puts == self.race_on_put and current is not None:
            current["v"] = {"N": str(int(current["v"]["N"]) + 1)}  # a concurrent writer won
        version = current.get("v") if current else None
        if ConditionExpression == "attribute_not_exists(#v)":
            ok = version is None
        else:
            assert ExpressionAttributeValues is not None
            ok = version == ExpressionAttributeValues[":v"]
        if not ok:
            raise ConditionFailed()
        self.items[key] = Item


def test_process_batch_replay_poison_and_log_line(caplog: pytest.LogCaptureFixture) -> None:
    records, expected = chain([(0, 1000, 0, 0), (0, 3000, 1000, 10), (1, 500, 0, 20),
                               (0, 2000, 0, 2 * HOUR_MS)])
    poison = record(99, "e1", "gpt", None, {"cn#rpm": 1}, ts=BASE_MS)
    poison["dynamodb"]["NewImage"]["cn#rpm"] = {"S": "x"}
    batch = [*records[:2], poison, *records[2:]]
    client = FakeClient()
    table = SnapshotTable(client, "ZAEL-t")
    with caplog.at_level(logging.INFO, logger="zae_limiter.aggregator"):
        result = process_batch(batch, table, windows.WINDOWS, 90, clock)
    assert result.response() == {"batchItemFailures": [{"itemIdentifier": str(10**20 + 99)}]}
    assert (result.records, result.processed, result.failed) == (5, 4, 1)
    assert result.snapshots_updated == len(expected)
    done = [r.getMessage() for r in caplog.records if "Batch processing completed" in r.message]
    assert len(done) == 1
    match = re.search(r'processing_time_ms":(?P<duration>[\d.]+)', done[0])
    assert match is not None
    assert json.loads(done[0])["failed"] == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and str(10**20 + 99) in errors[0].getMessage()

    for (pk, sk), item in client.items.items():
        resource, window, start = schema.parse_usage_sk(sk)
        key = snap.SnapshotKey(schema.entity_id_from_pk(pk), resource, window, start)
        consumed, released = expected[key].get("rpm", [0, 0])
        snapshot = snapshot_from_item(item)
        assert snapshot.counters.get("rpm", 0) == (consumed - released) // 1000
        assert item[schema.TTL_ATTRIBUTE]["N"].isdigit()

    before = copy.deepcopy(client.items)
    again = process_batch(list(reversed(batch)), table, windows.WINDOWS, 90, lambda: NOW + 60)
    assert again.snapshots_updated == 0
    assert client.items == before


def test_lost_race_is_retried_not_lost() -> None:
    records, _ = chain([(0, 1000, 0, 0)])
    client = FakeClient()
    table = SnapshotTable(client, "ZAEL-t")
    process_batch(records, table, ("hourly",), 90, clock)
    more, _ = chain([(0, 1000, 0, 0), (0, 4000, 0, 5)])
    client.race_on_put = client.puts + 1
    result = process_batch(more[1:], table, ("hourly",), 90, clock)
    assert result.failed == 0
    (item,) = client.items.values()
    assert item["v"]["N"] == "3"  # ours landed on top of the concurrent write
    assert decode_spans(item) == {"rpm": {"cn": [(0, 1000)]}, "tpm": {"cn": [(0, 4000)]}}


def test_failed_snapshot_write_fails_only_its_records() -> None:
    records, _ = chain([(0, 1000, 0, 0), (2, 1000, 0, 0), (0, 500, 0, 5)])
    table = SnapshotTable(FakeClient(fail_for="e2"), "ZAEL-t")
    result = process_batch(records, table, windows.WINDOWS, 90, clock)
    assert result.failed_sequence_numbers == [str(10**20 + 1)]
    assert result.processed == 2


def test_settings_from_env() -> None:
    s = Settings.from_env({"TABLE_NAME": "app", "USAGE_WINDOWS": "daily",
                           "SNAPSHOT_TTL_DAYS": "7", "LOG_LEVEL": "debug"})
    assert (s.table_name, s.windows, s.ttl_days, s.log_level) == ("ZAEL-app", ("daily",), 7,
                                                                   "DEBUG")
    assert Settings.from_env({"TABLE_NAME": "ZAEL-x"}).windows == ("hourly", "daily")
    for bad in ({}, {"TABLE_NAME": "a", "SNAPSHOT_TTL_DAYS": "0"},
                {"TABLE_NAME": "a", "USAGE_WINDOWS": "yearly"}):
        with pytest.raises(ValueError):
            Settings.from_env(bad)


# ---------------------------------------------------------------------------
# Reading snapshots
# ---------------------------------------------------------------------------


def test_usage_query_shapes() -> None:
    full = usage_query("e1", "gpt", "hourly", "2024-01-01T05:17:00Z",
                       datetime(2024, 1, 1, 8, 0, tzinfo=UTC))
    assert full["KeyConditionExpression"] == "#pk = :pk AND #sk BETWEEN :lo AND :hi"
    assert full["ExpressionAttributeValues"][":lo"] == {
        "S": schema.usage_sk("gpt", "hourly", "2024-01-01T05:00Z")}
    assert "FilterExpression" not in full

    every = usage_query("e1", None, "daily", start="2024-01-01")
    assert every["ExpressionAttributeValues"][":prefix"] == {"S": schema.usage_sk()}
    assert every["FilterExpression"] == "(#window = :w0 AND #ws >= :lo0)"

    anything = usage_query("e1")
    assert "FilterExpression" not in anything and "TableName" not in anything
    with pytest.raises(ValueError):
        usage_query("e1", "gpt", "weekly")
    with pytest.raises(ValueError):
        usage_query("e1", "gpt", "hourly", start="yesterday")


def test_snapshot_from_item_and_summarize() -> None:
    item = {
        schema.PK: {"S": schema.entity_pk("e1")},
        schema.SK: {"S": schema.usage_sk("gpt", "daily", "2024-01-02")},
        "counters": {"M": {"rpm": {"N": "12"}, "tpm": {"N": "2.5"}}},
        "updated_at": {"S": "2024-01-02T03:04:05.000Z"},
    }
    snapshot = snapshot_from_item(item)
    assert snapshot == UsageSnapshot("e1", "gpt", "daily", "2024-01-02", {"rpm": 12, "tpm": 2},
                                     "2024-01-02T03:04:05.000Z")
    with pytest.raises(ValueError):
        snapshot_from_item({schema.PK: {"S": "x"}})
    other = UsageSnapshot("e1", "gpt", "daily", "2024-01-01", {"rpm": 4})
    summary = summarize([snapshot, other], "e1")
    assert summary.totals == {"rpm": 16, "tpm": 2}
    assert summary.averages == {"rpm": 8.0, "tpm": 1.0}
    assert (summary.start, summary.end, summary.snapshot_count) == (
        "2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z", 2)
    assert (summary.resource, summary.window) == ("gpt", "daily")
