"""Local stream runner: feed a table's DynamoDB stream to ``process_batch`` without Lambda.

Reads every shard through the DynamoDB Streams API (DescribeStream, GetShardIterator, GetRecords),
turns the records into the shape Lambda delivers, and processes them batch by batch exactly as
the deployed function would. Useful against the embedded moto server (whose Lambda cannot run
code) and for catching up by hand when the function is disabled.

Checkpoints (last sequence number processed per shard) are kept in memory and, if a file is
given, in JSON so that a later run resumes where this one stopped. Re-reading from the start is
always safe: folding is idempotent.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import schema
from .handler import (
    BatchResult,
    Clock,
    SnapshotTable,
    log_event,
    process_batch,
    sequence_number,
    sequence_order,
)


def to_lambda_record(record: Mapping[str, Any], stream_arn: str) -> dict[str, Any]:
    """A GetRecords record in the shape of a Lambda event record.

    The API returns ``ApproximateCreationDateTime`` as a datetime where Lambda sends epoch
    seconds, and Lambda adds ``eventSourceARN``.
    """
    out = dict(record)
    dynamodb = dict(record.get("dynamodb", {}))
    created = dynamodb.get("ApproximateCreationDateTime")
    if isinstance(created, datetime):
        dynamodb["ApproximateCreationDateTime"] = created.timestamp()
    out["dynamodb"] = dynamodb
    out["eventSourceARN"] = stream_arn
    return out


def matches_any_filter(
    record: Any, patterns: Sequence[Any] = schema.AGGREGATOR_FILTER_PATTERNS
) -> bool:
    """Whether the function's event source mapping passes `record`: Lambda ORs its filters."""
    return any(matches_filter(record, pattern) for pattern in patterns)


def matches_filter(value: Any, pattern: Any = schema.AGGREGATOR_FILTER_PATTERN) -> bool:
    """Lambda's event filtering, for the subset of the pattern syntax the deployment uses
    (nested objects; lists of exact values or ``{"prefix": ...}``): the runner must see exactly
    the records the function sees, and not, say, the stream records of its own snapshot writes.
    """
    if isinstance(pattern, Mapping):
        return isinstance(value, Mapping) and all(
            key in value and matches_filter(value[key], sub) for key, sub in pattern.items()
        )
    if isinstance(pattern, list):
        for option in pattern:
            if isinstance(option, Mapping) and "prefix" in option:
                if isinstance(value, str) and value.startswith(str(option["prefix"])):
                    return True
            elif value == option:
                return True
        return False
    return bool(value == pattern)


@dataclass
class RunResult:
    shards: int = 0
    batches: int = 0
    records: int = 0
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    snapshots_updated: int = 0
    audit_changes: int = 0
    failed_sequence_numbers: list[str] = field(default_factory=list)

    def add(self, other: RunResult) -> None:
        self.batches += other.batches
        self.records += other.records
        self.processed += other.processed
        self.skipped += other.skipped
        self.failed += other.failed
        self.snapshots_updated += other.snapshots_updated
        self.audit_changes += other.audit_changes
        self.failed_sequence_numbers.extend(other.failed_sequence_numbers)

    def as_dict(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "batches": self.batches,
            "records": self.records,
            "processed": self.processed,
            "skipped": self.skipped,
            "failed": self.failed,
            "snapshots_updated": self.snapshots_updated,
            "audit_changes": self.audit_changes,
        }


class StreamRunner:
    """Drains (or follows) one table's stream into usage snapshots."""

    def __init__(self, table_name: str, dynamodb: Any, streams: Any, windows: Sequence[str],
                 ttl_days: int, clock: Clock = time.time, batch_size: int = 100,
                 max_retries: int = 2, checkpoint_file: str | os.PathLike[str] | None = None
                 ) -> None:
        self.table_name = table_name
        self.dynamodb = dynamodb
        self.streams = streams
        self.windows = tuple(windows)
        self.ttl_days = ttl_days
        self.clock = clock
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.table = SnapshotTable(dynamodb, table_name)
        self.checkpoint_file = Path(checkpoint_file) if checkpoint_file is not None else None
        self.checkpoints: dict[str, dict[str, str]] = self._load_checkpoints()
        self._closed: set[tuple[str, str]] = set()

    # -- checkpoints ---------------------------------------------------------------------------

    def _load_checkpoints(self) -> dict[str, dict[str, str]]:
        if self.checkpoint_file is None or not self.checkpoint_file.exists():
            return {}
        data = json.loads(self.checkpoint_file.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{self.checkpoint_file}: not a checkpoint file")
        return {str(arn): {str(k): str(v) for k, v in shards.items()}
                for arn, shards in data.items() if isinstance(shards, dict)}

    def _save_checkpoints(self) -> None:
        if self.checkpoint_file is None:
            return
        tmp = self.checkpoint_file.with_name(self.checkpoint_file.name + ".tmp")
        tmp.write_text(json.dumps(self.checkpoints, indent=2, sort_keys=True))
        tmp.replace(self.checkpoint_file)  # atomic: a crash never leaves half a file

    # -- stream --------------------------------------------------------------------------------

    def stream_arn(self) -> str:
        table = self.dynamodb.describe_table(TableName=self.table_name)["Table"]
        arn = table.get("LatestStreamArn")
        spec = table.get("StreamSpecification") or {}
        if not arn or not spec.get("StreamEnabled", True):
            raise RuntimeError(f"table {self.table_name} has no stream enabled")
        return str(arn)

    def shards(self, stream_arn: str) -> list[dict[str, Any]]:
        """All shards, parents before children (so that records of a key come in order)."""
        shards: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"StreamArn": stream_arn}
        while True:
            description = self.streams.describe_stream(**kwargs)["StreamDescription"]
            shards.extend(description.get("Shards", []))
            last = description.get("LastEvaluatedShardId")
            if not last:
                break
            kwargs["ExclusiveStartShardId"] = last
        by_id = {s["ShardId"]: s for s in shards}
        ordered: list[dict[str, Any]] = []
        seen: set[str] = set()

        def visit(shard: dict[str, Any]) -> None:
            if shard["ShardId"] in seen:
                return
            seen.add(shard["ShardId"])
            parent = by_id.get(shard.get("ParentShardId", ""))
            if parent is not None:
                visit(parent)
            ordered.append(shard)

        for shard in shards:
            visit(shard)
        return ordered

    def _iterator(self, stream_arn: str, shard_id: str) -> str | None:
        last = self.checkpoints.get(stream_arn, {}).get(shard_id)
        kwargs: dict[str, Any] = {"StreamArn": stream_arn, "ShardId": shard_id}
        if last is None:
            kwargs["ShardIteratorType"] = "TRIM_HORIZON"
        else:
            kwargs.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", SequenceNumber=last)
        iterator = self.streams.get_shard_iterator(**kwargs).get("ShardIterator")
        return str(iterator) if iterator else None

    def _process(self, records: list[dict[str, Any]]) -> RunResult:
        """One batch with Lambda's retry semantics: retry from the lowest failed record, then give
        up on what still fails (Lambda would hand it to the on-failure destination)."""
        first = process_batch(records, self.table, self.windows, self.ttl_days, self.clock)
        last: BatchResult = first
        updated = first.snapshots_updated
        for _ in range(self.max_retries):
            if not last.failed_sequence_numbers:
                break
            lowest = sequence_order(last.failed_sequence_numbers[0])
            suffix = [r for r in records if sequence_order(sequence_number(r) or "0") >= lowest]
            last = process_batch(suffix, self.table, self.windows, self.ttl_days, self.clock)
            updated += last.snapshots_updated
        if last.failed:
            log_event(logging.ERROR, "Records given up after retries",
                      sequence_numbers=last.failed_sequence_numbers)
        return RunResult(
            batches=1,
            records=first.records,
            processed=first.processed + first.failed - last.failed,
            skipped=first.skipped,
            failed=last.failed,
            snapshots_updated=updated,
            audit_changes=first.audit_changes,
            failed_sequence_numbers=list(last.failed_sequence_numbers),
        )

    def _drain_shard(self, stream_arn: str, shard: Mapping[str, Any],
                     stop: threading.Event | None) -> RunResult:
        shard_id = str(shard["ShardId"])
        result = RunResult()
        if (stream_arn, shard_id) in self._closed:
            return result
        iterator = self._iterator(stream_arn, shard_id)
        while iterator and not (stop is not None and stop.is_set()):
            response = self.streams.get_records(ShardIterator=iterator, Limit=self.batch_size)
            raw = response.get("Records", [])
            iterator = response.get("NextShardIterator")
            if not raw:
                # An open shard always hands out a next iterator; empty means caught up.
                break
            records = [to_lambda_record(r, stream_arn) for r in raw]
            wanted = [r for r in records if matches_any_filter(r)]
            if wanted:
                result.add(self._process(wanted))
            last_seq = sequence_number(records[-1])
            if last_seq is not None:
                self.checkpoints.setdefault(stream_arn, {})[shard_id] = last_seq
                self._save_checkpoints()
        if iterator is None:
            self._closed.add((stream_arn, shard_id))  # closed and fully read: skip it from now on
        return result

    def run_once(self, stop: threading.Event | None = None) -> RunResult:
        """Process everything currently in the stream, then return the counts."""
        arn = self.stream_arn()
        shards = self.shards(arn)
        total = RunResult(shards=len(shards))
        for shard in shards:
            if stop is not None and stop.is_set():
                break
            total.add(self._drain_shard(arn, shard, stop))
        return total

    def follow(self, duration: float | None = None, poll_interval: float = 1.0,
               stop: threading.Event | None = None) -> RunResult:
        """Keep draining until ``stop`` is set or ``duration`` seconds have passed."""
        stop = stop or threading.Event()
        deadline = None if duration is None else time.monotonic() + duration
        total = RunResult()
        while not stop.is_set():
            result = self.run_once(stop)
            total.shards = max(total.shards, result.shards)
            total.add(result)
            if deadline is not None and time.monotonic() >= deadline:
                break
            wait = poll_interval if result.records == 0 else 0.0
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            if wait and stop.wait(wait):
                break
        return total
