"""Aggregator against moto's server: bucket writes -> stream -> snapshots, replays, DLQ, CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from botocore.config import Config
from click.testing import CliRunner

from zae_limiter import schema
from zae_limiter.aggregator.dlq import replay
from zae_limiter.aggregator.handler import SnapshotTable, process_batch
from zae_limiter.aggregator.stream import StreamRunner, to_lambda_record
from zae_limiter.cli import main
from zae_limiter.models import UsageSnapshot
from zae_limiter.storage.dynamodb.repository import Repository

pytestmark = pytest.mark.integration

NAME = "agg"
TABLE = schema.table_name(NAME)
WINDOWS = ("hourly", "daily")
# moto answers some invalid requests with HTTP 500, which botocore would retry for seconds.
CONFIG = Config(retries={"max_attempts": 2, "mode": "standard"})
NOW = datetime(2024, 5, 1, 12, 30, tzinfo=UTC).timestamp()


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


@dataclass
class Aws:
    endpoint_url: str
    ddb: Any
    streams: Any
    sqs: Any

    def runner(self, **kwargs: Any) -> StreamRunner:
        return StreamRunner(TABLE, self.ddb, self.streams, WINDOWS, 90, clock=lambda: NOW,
                            **kwargs)

    def write(self, entity: str, resource: str, ts: int, consume: dict[str, int] | None = None,
              release: dict[str, int] | None = None) -> None:
        """What the limiter's acquire/adjust/rollback does to a bucket item (design.md §2)."""
        names = {"#ts": schema.WRITE_TIME, "#e": "entity_id", "#r": "resource"}
        values: dict[str, Any] = {":ts": {"N": str(ts)}, ":e": {"S": entity}, ":r": {"S": resource}}
        adds: list[str] = []
        sets = ["#ts = :ts", "#e = :e", "#r = :r"]
        for i, (field, amounts) in enumerate(
            ((schema.CONSUMED, consume or {}), (schema.RELEASED, release or {}))
        ):
            for j, (limit, milli) in enumerate(amounts.items()):
                tag = f"{i}{j}"
                names[f"#c{tag}"] = schema.limit_attr(field, limit)
                values[f":c{tag}"] = {"N": str(milli)}
                adds.append(f"#c{tag} :c{tag}")
                names[f"#t{tag}"] = schema.limit_attr(schema.TOKENS, limit)
                names[f"#l{tag}"] = schema.limit_attr(schema.LAST_REFILL, limit)
                values[f":t{tag}"] = {"N": "1000"}
                values[f":l{tag}"] = {"N": str(ts)}
                sets += [f"#t{tag} = :t{tag}", f"#l{tag} = :l{tag}"]
        self.ddb.update_item(
            TableName=TABLE,
            Key={schema.PK: {"S": schema.entity_pk(entity)},
                 schema.SK: {"S": schema.bucket_sk(resource)}},
            UpdateExpression="SET " + ", ".join(sets) + (" ADD " + ", ".join(adds) if adds else ""),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    def stream_records(self) -> list[dict[str, Any]]:
        arn = self.ddb.describe_table(TableName=TABLE)["Table"]["LatestStreamArn"]
        out: list[dict[str, Any]] = []
        for shard in self.streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]:
            it = self.streams.get_shard_iterator(StreamArn=arn, ShardId=shard["ShardId"],
                                                 ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
            while it:
                page = self.streams.get_records(ShardIterator=it)
                if not page["Records"]:
                    break
                out += [to_lambda_record(r, arn) for r in page["Records"]]
                it = page.get("NextShardIterator")
        return out

    def snapshots(self, entity: str, resource: str | None = None, window: str | None = None
                  ) -> dict[tuple[str, str, str], UsageSnapshot]:
        async def read() -> list[UsageSnapshot]:
            async with Repository(TABLE, "us-east-1", self.endpoint_url) as repo:
                return await repo.get_usage_snapshots(entity, resource, window)

        return {(s.resource, s.window, s.window_start): s for s in asyncio.run(read())}

    def usage_items(self) -> list[dict[str, Any]]:
        items = self.ddb.scan(TableName=TABLE)["Items"]
        return sorted((i for i in items if i[schema.SK]["S"].startswith(schema.usage_sk())),
                      key=lambda i: (i[schema.PK]["S"], i[schema.SK]["S"]))


@pytest.fixture
def aws(endpoint_url: str) -> Iterator[Aws]:
    def client(service: str) -> Any:
        return boto3.client(service, endpoint_url=endpoint_url, region_name="us-east-1",
                            config=CONFIG)

    env = Aws(endpoint_url, client("dynamodb"), client("dynamodbstreams"), client("sqs"))
    env.ddb.create_table(**schema.TABLE.create_table_kwargs(TABLE))
    yield env


def test_stream_runner_builds_exact_snapshots_and_replay_changes_nothing(aws: Aws) -> None:
    t0 = ms(2024, 5, 1, 10, 15)
    aws.write("e1", "gpt", t0, consume={"rpm": 1000, "tpm": 250_000})
    aws.write("e1", "gpt", t0 + 1000, consume={"rpm": 1000, "tpm": 120_000})
    aws.write("e1", "gpt", t0 + 2000, release={"tpm": 70_000})  # adjust: fewer tokens used
    aws.write("e1", "claude", t0 + 3000, consume={"rpm": 1000})
    aws.write("e1", "claude", t0 + 4000, release={"rpm": 1000})  # rollback
    aws.write("e2", "gpt", t0 + 5000, consume={"rpm": 3000})

    result = aws.runner().run_once()
    assert result.failed == 0
    assert result.records >= 6  # moto emits two INSERT records when UpdateItem creates an item
    e1 = aws.snapshots("e1")
    for window, start in (("hourly", "2024-05-01T10:00Z"), ("daily", "2024-05-01")):
        assert e1[("gpt", window, start)].counters == {"rpm": 2, "tpm": 300}
        assert e1[("claude", window, start)].counters == {"rpm": 0}
    assert aws.snapshots("e2", "gpt", "daily")[("gpt", "daily", "2024-05-01")].counters == {
        "rpm": 3}

    before = aws.usage_items()
    # A fresh runner has no checkpoint: the whole stream is delivered a second time.
    again = aws.runner().run_once()
    assert again.records == result.records
    assert again.snapshots_updated == 0
    assert aws.usage_items() == before
    # Same batch shuffled, straight into process_batch: still nothing to change.
    records = aws.stream_records()
    shuffled = records[1::2] + records[::2]
    replayed = process_batch(shuffled, SnapshotTable(aws.ddb, TABLE), WINDOWS, 90, lambda: NOW)
    assert (replayed.failed, replayed.snapshots_updated) == (0, 0)
    assert aws.usage_items() == before


def test_checkpoints_resume_where_the_last_run_stopped(aws: Aws, tmp_path: Any) -> None:
    checkpoint = tmp_path / "cp.json"
    t0 = ms(2024, 5, 1, 10, 15)
    aws.write("e1", "gpt", t0, consume={"rpm": 1000})
    first = aws.runner(checkpoint_file=checkpoint).run_once()
    assert json.loads(checkpoint.read_text())
    aws.write("e1", "gpt", t0 + 10, consume={"rpm": 2000})
    second = aws.runner(checkpoint_file=checkpoint).run_once()
    assert (first.records, second.records) == (2, 1)
    assert aws.snapshots("e1")[("gpt", "hourly", "2024-05-01T10:00Z")].counters == {"rpm": 3}


def test_poison_record_is_reported_and_the_rest_applied(aws: Aws) -> None:
    t0 = ms(2024, 5, 1, 10, 15)
    aws.write("e1", "gpt", t0, consume={"rpm": 1000})
    aws.ddb.put_item(TableName=TABLE, Item={  # a counter that is not a number
        schema.PK: {"S": schema.entity_pk("bad")}, schema.SK: {"S": schema.bucket_sk("gpt")},
        schema.limit_attr(schema.CONSUMED, "rpm"): {"S": "oops"},
        schema.WRITE_TIME: {"N": str(t0)},
    })
    aws.write("e2", "gpt", t0 + 1, consume={"rpm": 4000})

    records = aws.stream_records()
    poison = next(r for r in records if r["dynamodb"]["Keys"][schema.PK]["S"].endswith("bad"))
    result = process_batch(records, SnapshotTable(aws.ddb, TABLE), WINDOWS, 90, lambda: NOW)
    assert result.response() == {
        "batchItemFailures": [{"itemIdentifier": poison["dynamodb"]["SequenceNumber"]}]
    }
    assert result.failed == 1
    assert aws.snapshots("e1")[("gpt", "daily", "2024-05-01")].counters == {"rpm": 1}
    assert aws.snapshots("e2")[("gpt", "daily", "2024-05-01")].counters == {"rpm": 4}

    # The runner retries the failing suffix as Lambda would, then gives up on the poison only.
    run = aws.runner(max_retries=1).run_once()
    assert (run.failed, run.failed_sequence_numbers) == (1, [poison["dynamodb"]["SequenceNumber"]])


def test_snapshots_land_in_their_windows_across_a_boundary(aws: Aws) -> None:
    aws.write("e1", "gpt", ms(2024, 4, 30, 23, 59, 59) + 500, consume={"rpm": 1000})
    aws.write("e1", "gpt", ms(2024, 5, 1, 0, 0, 0) + 100, consume={"rpm": 2000})
    aws.write("e1", "gpt", ms(2024, 5, 1, 0, 59, 59), consume={"rpm": 4000})
    aws.write("e1", "gpt", ms(2024, 5, 1, 1, 0, 0), consume={"rpm": 8000})
    assert aws.runner().run_once().failed == 0
    got = {key: s.counters["rpm"] for key, s in aws.snapshots("e1").items()}
    assert got == {
        ("gpt", "hourly", "2024-04-30T23:00Z"): 1,
        ("gpt", "hourly", "2024-05-01T00:00Z"): 6,
        ("gpt", "hourly", "2024-05-01T01:00Z"): 8,
        ("gpt", "daily", "2024-04-30"): 1,
        ("gpt", "daily", "2024-05-01"): 14,
    }
    item = next(i for i in aws.usage_items() if i["window_start"]["S"] == "2024-04-30")
    # TTL counts from the window's end (90 days after 2024-05-01T00:00Z).
    assert int(item[schema.TTL_ATTRIBUTE]["N"]) == int(
        datetime(2024, 7, 30, tzinfo=UTC).timestamp())


def _on_failure_message(records: list[dict[str, Any]], shard_id: str) -> str:
    """What Lambda sends to the on-failure destination of a DynamoDB event-source mapping."""
    first, last = records[0]["dynamodb"], records[-1]["dynamodb"]
    return json.dumps({
        "requestContext": {
            "requestId": "316aa6d0-8154-xmpl-9af7-85d5f4a6bc81",
            "functionArn": f"arn:aws:lambda:us-east-1:123456789012:function:{TABLE}-aggregator",
            "condition": "RetryAttemptsExhausted",
            "approximateInvokeCount": 3,
        },
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST",
                            "functionError": "Unhandled"},
        "version": "1.0",
        "timestamp": "2024-05-01T12:00:00.000Z",
        "DDBStreamBatchInfo": {
            "shardId": shard_id,
            "startSequenceNumber": first["SequenceNumber"],
            "endSequenceNumber": last["SequenceNumber"],
            "approximateArrivalOfFirstRecord": "2024-05-01T11:59:58Z",
            "approximateArrivalOfLastRecord": "2024-05-01T11:59:59Z",
            "batchSize": len(records),
            "streamArn": records[0]["eventSourceARN"],
        },
    })


def test_dlq_replay_applies_the_failed_batches_and_empties_the_queue(aws: Aws) -> None:
    t0 = ms(2024, 5, 1, 10, 15)
    aws.write("e1", "gpt", t0, consume={"rpm": 1000})
    aws.write("e1", "gpt", t0 + 1, consume={"rpm": 2000})
    aws.write("e2", "gpt", t0 + 2, consume={"rpm": 5000})
    records = aws.stream_records()
    shard = aws.streams.describe_stream(StreamArn=records[0]["eventSourceARN"])[
        "StreamDescription"]["Shards"][0]["ShardId"]
    e1 = [r for r in records if r["dynamodb"]["Keys"][schema.PK]["S"].endswith("e1")]
    e2 = [r for r in records if r["dynamodb"]["Keys"][schema.PK]["S"].endswith("e2")]

    queue_url = aws.sqs.create_queue(QueueName=schema.aggregator_dlq_name(NAME))["QueueUrl"]
    aws.sqs.send_message(QueueUrl=queue_url, MessageBody=_on_failure_message(e1, shard))
    aws.sqs.send_message(QueueUrl=queue_url, MessageBody=_on_failure_message(e2, shard))

    result = replay(aws.sqs, queue_url, aws.streams, SnapshotTable(aws.ddb, TABLE), WINDOWS, 90,
                    clock=lambda: NOW, wait_seconds=0)
    assert result.as_dict() == {"received": 2, "replayed": 2, "records": len(records),
                                "failed": 0, "rejected": 0, "deleted": 2, "snapshots_updated": 4,
                                "errors": []}
    assert aws.snapshots("e1")[("gpt", "hourly", "2024-05-01T10:00Z")].counters == {"rpm": 3}
    assert aws.snapshots("e2")[("gpt", "hourly", "2024-05-01T10:00Z")].counters == {"rpm": 5}
    attrs = aws.sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    assert attrs == {"ApproximateNumberOfMessages": "0",
                     "ApproximateNumberOfMessagesNotVisible": "0"}


def test_dlq_message_that_cannot_be_replayed_is_kept(aws: Aws) -> None:
    queue_url = aws.sqs.create_queue(QueueName=schema.aggregator_dlq_name(NAME))["QueueUrl"]
    aws.sqs.send_message(QueueUrl=queue_url, MessageBody='{"unexpected": true}')
    result = replay(aws.sqs, queue_url, aws.streams, SnapshotTable(aws.ddb, TABLE), WINDOWS, 90,
                    wait_seconds=0, visibility_timeout=0)
    assert (result.received, result.rejected, result.failed, result.deleted) == (1, 1, 0, 0)
    assert "no DDBStreamBatchInfo" in result.errors[0]
    attrs = aws.sqs.get_queue_attributes(QueueUrl=queue_url,
                                         AttributeNames=["ApproximateNumberOfMessages"])
    assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "1"


def _forge(entity: str, resource: str, ts: int, tokens: int) -> dict[str, Any]:
    """A stream record as an attacker able to send to the queue would write it."""
    keys = {schema.PK: {"S": schema.entity_pk(entity)},
            schema.SK: {"S": schema.bucket_sk(resource)}}
    image = {**keys, "entity_id": {"S": entity}, "resource": {"S": resource},
             schema.WRITE_TIME: {"N": str(ts)},
             schema.limit_attr(schema.CONSUMED, "tpm"): {"N": str(tokens * 1000)}}
    return {"eventID": "1", "eventName": "MODIFY", "eventSource": "aws:dynamodb",
            "eventSourceARN": f"arn:aws:dynamodb:us-east-1:123456789012:table/{TABLE}/stream/x",
            "dynamodb": {"Keys": keys, "SequenceNumber": "99999999999999999999",
                         "OldImage": {**keys, "entity_id": {"S": entity},
                                      "resource": {"S": resource},
                                      schema.WRITE_TIME: {"N": str(ts - 1)},
                                      schema.limit_attr(schema.CONSUMED, "tpm"): {"N": "0"}},
                         "NewImage": image, "StreamViewType": "NEW_AND_OLD_IMAGES"}}


def test_dlq_replay_rejects_forged_bodies_and_applies_nothing(aws: Aws) -> None:
    """A message carrying records (or pointing at another table's stream) is never applied."""
    t0 = ms(2024, 5, 1, 10, 15)
    aws.write("victim", "gpt", t0, consume={"tpm": 9000})
    assert aws.runner().run_once().failed == 0
    before = aws.usage_items()
    assert aws.snapshots("victim")[("gpt", "hourly", "2024-05-01T10:00Z")].counters == {"tpm": 9}

    queue_url = aws.sqs.create_queue(QueueName=schema.aggregator_dlq_name(NAME))["QueueUrl"]
    forged = _forge("victim", "gpt", t0 + 5, 1_000_000_000)
    aws.sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"Records": [forged]}))
    aws.sqs.send_message(QueueUrl=queue_url,
                         MessageBody=json.dumps({"requestPayload": {"Records": [forged]}}))
    records = aws.stream_records()
    shard = aws.streams.describe_stream(StreamArn=records[0]["eventSourceARN"])[
        "StreamDescription"]["Shards"][0]["ShardId"]
    foreign = json.loads(_on_failure_message(records, shard))
    foreign["DDBStreamBatchInfo"]["streamArn"] = (
        "arn:aws:dynamodb:us-east-1:123456789012:table/ZAEL-other/stream/2024-01-01T00:00:00.000")
    aws.sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(foreign))

    result = replay(aws.sqs, queue_url, aws.streams, SnapshotTable(aws.ddb, TABLE), WINDOWS, 90,
                    clock=lambda: NOW, wait_seconds=0, visibility_timeout=0)
    assert aws.snapshots("victim")[("gpt", "hourly", "2024-05-01T10:00Z")].counters == {"tpm": 9}
    assert aws.usage_items() == before
    assert (result.received, result.rejected, result.replayed, result.deleted) == (3, 3, 0, 0)
    assert result.records == 0 and result.snapshots_updated == 0
    assert all("rejected" in error for error in result.errors)

    cli = CliRunner()
    out = cli.invoke(main, ["dlq", "replay", "--name", NAME, "--endpoint-url", aws.endpoint_url,
                            "--region", "us-east-1"])
    assert out.exit_code == 1 and "rejected" in out.output, out.output
    assert aws.usage_items() == before


def test_cli_run_usage_and_dlq(aws: Aws) -> None:
    now = datetime.now(UTC)
    aws.write("e1", "gpt", int(now.timestamp() * 1000), consume={"rpm": 3000, "tpm": 42_000})
    cli = CliRunner()
    common = ["--name", NAME, "--endpoint-url", aws.endpoint_url, "--region", "us-east-1"]

    run = cli.invoke(main, ["aggregator", "run", *common, "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["failed"] == 0

    shown = cli.invoke(main, ["usage", *common, "--entity", "e1", "--resource", "gpt"])
    assert shown.exit_code == 0, shown.output
    assert "tpm" in shown.output and "█" in shown.output and "42" in shown.output

    as_json = cli.invoke(main, ["usage", *common, "--entity", "e1", "--window", "daily", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["summary"]["totals"] == {"rpm": 3, "tpm": 42}

    missing = cli.invoke(main, ["dlq", "replay", *common])
    assert missing.exit_code == 1
    assert "does not exist" in missing.output and "Traceback" not in missing.output
    aws.sqs.create_queue(QueueName=schema.aggregator_dlq_name(NAME))
    empty = cli.invoke(main, ["dlq", "replay", *common, "--json"])
    assert empty.exit_code == 0, empty.output
    assert json.loads(empty.output)["received"] == 0

    bad = cli.invoke(main, ["usage", *common, "--entity", "e1", "--start", "yesterday"])
    assert bad.exit_code == 1 and "not an ISO-8601 time" in bad.output


async def test_limiter_end_to_end_snapshots_equal_net_consumption(aws: Aws) -> None:
    """Real acquires, adjustments, releases and rollbacks -> stream -> snapshots."""
    from zae_limiter import Limit, RateLimiter, StackOptions

    t0 = ms(2027, 1, 15, 8, 30)
    now = [t0]
    limits = [Limit.per_minute("rpm", 100), Limit.per_minute("tpm", 100_000)]
    aws.ddb.delete_table(TableName=TABLE)  # the limiter provisions its own table
    async with RateLimiter(name=NAME, endpoint_url=aws.endpoint_url,
                           stack_options=StackOptions(), clock=lambda: now[0]) as limiter:
        async with limiter.acquire("k1", "gpt", limits, {"rpm": 1, "tpm": 500}) as lease:
            await lease.adjust(tpm=300)
        with pytest.raises(RuntimeError):
            async with limiter.acquire("k1", "gpt", limits, {"rpm": 1, "tpm": 200}):
                raise RuntimeError("the LLM call failed: everything is given back")
        now[0] += 40 * 60_000  # next hour
        async with limiter.acquire("k1", "gpt", limits, {"rpm": 1, "tpm": 400}) as lease:
            await lease.adjust(tpm=-100)
            await lease.release(rpm=1)
        async with limiter.acquire("k2", "gpt", limits, {"rpm": 2}):
            pass

        result = aws.runner().run_once()
        assert result.failed == 0

        hourly = await limiter.get_usage_snapshots("k1", "gpt", "hourly", "2027-01-15T00:00Z",
                                                   "2027-01-15T23:59Z")
        assert [(s.window_start, s.counters) for s in hourly] == [
            ("2027-01-15T08:00Z", {"rpm": 1, "tpm": 800}),
            ("2027-01-15T09:00Z", {"rpm": 0, "tpm": 300}),
        ]
        summary = await limiter.get_usage_summary("k1", "gpt", "daily", "2027-01-15",
                                                  "2027-01-15")
        assert (summary.snapshot_count, summary.totals) == (1, {"rpm": 1, "tpm": 1100})
        other = await limiter.get_usage_snapshots("k2", None, "daily")
        assert [s.counters for s in other] == [{"rpm": 2}]


def test_lambda_handler_reads_its_configuration_from_the_environment(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zae_limiter.aggregator import handler as module
    from zae_limiter.aggregator.handler import handler

    monkeypatch.setattr(module, "_settings", None)
    monkeypatch.setattr(module, "_table", None)
    # configure_logging() changes the module logger; keep that from leaking into other tests.
    monkeypatch.setattr(module.logger, "level", module.logger.level)
    monkeypatch.setattr(module.logger, "handlers", list(module.logger.handlers))
    for key, value in {"TABLE_NAME": TABLE, "USAGE_WINDOWS": "daily", "SNAPSHOT_TTL_DAYS": "7",
                       "LOG_LEVEL": "WARNING", "AWS_ENDPOINT_URL_DYNAMODB": aws.endpoint_url,
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    aws.write("e1", "gpt", ms(2024, 5, 1, 10, 15), consume={"rpm": 7000})
    assert handler({"Records": aws.stream_records()}, None) == {"batchItemFailures": []}
    assert {k[1]: s.counters for k, s in aws.snapshots("e1").items()} == {"daily": {"rpm": 7}}
    item = aws.usage_items()[0]
    assert int(item[schema.TTL_ATTRIBUTE]["N"]) == int(datetime(2024, 5, 9, tzinfo=UTC).timestamp())
