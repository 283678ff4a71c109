"""Replay of the aggregator's dead-letter queue (``ZAEL-<name>-aggregator-dlq``).

The queue is the on-failure destination of the function's DynamoDB event-source mapping. Lambda
does not put the failed records there, only where they are in the stream (see "Retaining
discarded records for a DynamoDB event source" in the Lambda developer guide)::

    {"requestContext": {"requestId": ..., "functionArn": ..., "condition": "RetryAttemptsExhausted",
                        "approximateInvokeCount": 3},
     "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": ...},
     "version": "1.0", "timestamp": "2025-06-05T18:22:26.479Z",
     "DDBStreamBatchInfo": {"shardId": ..., "startSequenceNumber": ..., "endSequenceNumber": ...,
                            "approximateArrivalOfFirstRecord": ...,
                            "approximateArrivalOfLastRecord": ...,
                            "batchSize": 1, "streamArn": ...}}

So a replay reads that sequence range back from the stream (AT_SEQUENCE_NUMBER) and runs it
through the same ``process_batch``. That only works while the stream still holds the records
(24 hours): older messages fail with a clear error and stay in the queue for an operator to
decide. A message is deleted only after all of its records were applied; replaying twice is
harmless because folding is idempotent.

Message bodies are not trusted: anyone able to send to the queue could write one. Only the
pointer above is accepted, and only for this table's stream; the records themselves always come
from the stream. Anything else -- a body carrying records (``{"Records": [...]}``), which would
let its sender write any usage it likes, or a pointer into another table's stream -- is
*rejected*: counted and reported, never applied, and left in the queue for an operator.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .handler import Clock, SnapshotTable, process_batch, sequence_number, sequence_order
from .stream import to_lambda_record


class ReplayError(RuntimeError):
    """A message whose records cannot be recovered (no longer in the stream, failing again)."""


class RejectedMessage(ReplayError):
    """A message that is not a stream-failure pointer into this table's stream: never applied."""


@dataclass
class ReplayResult:
    received: int = 0
    replayed: int = 0
    records: int = 0
    failed: int = 0
    rejected: int = 0
    deleted: int = 0
    snapshots_updated: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "replayed": self.replayed,
            "records": self.records,
            "failed": self.failed,
            "rejected": self.rejected,
            "deleted": self.deleted,
            "snapshots_updated": self.snapshots_updated,
            "errors": list(self.errors),
        }


def fetch_batch_records(streams: Any, info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The records of a ``DDBStreamBatchInfo`` range, in Lambda event shape."""
    try:
        arn = str(info["streamArn"])
        shard_id = str(info["shardId"])
        start = str(info["startSequenceNumber"])
        end = str(info["endSequenceNumber"])
    except KeyError as exc:
        raise ReplayError(f"DDBStreamBatchInfo lacks {exc.args[0]!r}") from None
    try:
        iterator = streams.get_shard_iterator(
            StreamArn=arn, ShardId=shard_id, ShardIteratorType="AT_SEQUENCE_NUMBER",
            SequenceNumber=start,
        ).get("ShardIterator")
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        if code in ("TrimmedDataAccessException", "ResourceNotFoundException"):
            raise ReplayError(
                f"records {start}..{end} of {shard_id} are no longer in the stream ({code}); "
                "streams keep records for 24 hours"
            ) from exc
        raise
    lo, hi = sequence_order(start), sequence_order(end)
    records: list[dict[str, Any]] = []
    while iterator:
        response = streams.get_records(ShardIterator=iterator, Limit=1000)
        raw = response.get("Records", [])
        iterator = response.get("NextShardIterator")
        if not raw:
            break
        done = False
        for record in raw:
            seq = sequence_order(record.get("dynamodb", {}).get("SequenceNumber", "0"))
            if seq > hi:
                done = True
                break
            if seq >= lo:
                records.append(to_lambda_record(record, arn))
        if done:
            break
    if not records or sequence_number(records[0]) != start:
        raise ReplayError(
            f"records {start}..{end} of {shard_id} are no longer in the stream; "
            "streams keep records for 24 hours"
        )
    return records


def _stream_table(stream_arn: str) -> str | None:
    """The table name of a DynamoDB stream ARN (``arn:...:table/<name>/stream/<label>``)."""
    head, sep, rest = stream_arn.partition(":table/")
    name, sep2, label = rest.partition("/stream/")
    if not (head.startswith("arn:") and sep and sep2 and name and label):
        return None
    return name


def records_from_body(body: str, streams: Any, table_name: str | None = None
                      ) -> list[dict[str, Any]]:
    """The records a stream-failure pointer designates, re-read from the stream.

    Raises `RejectedMessage` for any other body (including one carrying records) and for a
    pointer whose stream is not `table_name`'s (when given).
    """
    try:
        message = json.loads(body)
    except ValueError as exc:
        raise RejectedMessage(f"message body is not JSON: {exc}") from None
    if isinstance(message, Mapping) and message.get("Type") == "Notification":
        # Delivered through an SNS topic: the invocation record is the notification's text.
        return records_from_body(str(message.get("Message", "")), streams, table_name)
    if not isinstance(message, Mapping):
        raise RejectedMessage("message body is not a JSON object")
    info = message.get("DDBStreamBatchInfo")
    if not isinstance(info, Mapping):
        if "Records" in message or "requestPayload" in message:
            raise RejectedMessage(
                "message carries records instead of a DDBStreamBatchInfo pointer: bodies are "
                "not trusted, only the stream's own records are replayed"
            )
        raise RejectedMessage("message holds no DDBStreamBatchInfo (not a stream-failure record)")
    arn = info.get("streamArn")
    if not isinstance(arn, str) or _stream_table(arn) is None:
        raise RejectedMessage(f"DDBStreamBatchInfo has no valid streamArn ({arn!r})")
    if table_name is not None and _stream_table(arn) != table_name:
        raise RejectedMessage(f"DDBStreamBatchInfo points at another table's stream ({arn})")
    return fetch_batch_records(streams, info)


def replay(sqs: Any, queue_url: str, streams: Any, table: SnapshotTable, windows: Sequence[str],
           ttl_days: int, clock: Clock = time.time, max_messages: int | None = None,
           wait_seconds: int = 1, visibility_timeout: int = 60) -> ReplayResult:
    """Reprocess the queue's messages; delete each one whose records were all applied.

    Only stream-failure pointers into ``table``'s stream are replayed; other messages are
    counted in ``rejected`` (and ``errors``), not applied and not deleted.

    A message that fails stays invisible for ``visibility_timeout`` seconds; should it come back
    within the same run anyway (short timeout), the run stops instead of going round in circles.
    """
    result = ReplayResult()
    seen: set[str] = set()
    cycled = False
    while not cycled and (max_messages is None or result.received < max_messages):
        batch = 10 if max_messages is None else min(10, max_messages - result.received)
        response = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=batch, WaitTimeSeconds=wait_seconds,
            VisibilityTimeout=visibility_timeout,
        )
        messages = response.get("Messages", [])
        if not messages:
            break
        for message in messages:
            message_id = str(message.get("MessageId", "?"))
            if message_id in seen:
                cycled = True
                continue
            seen.add(message_id)
            result.received += 1
            try:
                records = records_from_body(str(message.get("Body", "")), streams,
                                            getattr(table, "table_name", None))
                result.records += len(records)
                batch_result = process_batch(records, table, windows, ttl_days, clock)
                result.snapshots_updated += batch_result.snapshots_updated
                if batch_result.failed:
                    raise ReplayError(
                        f"{batch_result.failed} of {len(records)} records failed again "
                        f"(first: {batch_result.failed_sequence_numbers[:1]})"
                    )
            except RejectedMessage as exc:
                result.rejected += 1
                result.errors.append(f"{message_id}: rejected: {exc}")
                continue
            except Exception as exc:
                result.failed += 1
                result.errors.append(f"{message_id}: {exc}")
                continue
            result.replayed += 1
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            result.deleted += 1
    return result
