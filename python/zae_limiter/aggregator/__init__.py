"""The usage aggregator: DynamoDB stream records of bucket items -> usage snapshots.

`handler` is the Lambda entry point (`zae_limiter.aggregator.handler.handler`); `stream` runs the
same processing against a table's stream from a workstation, `dlq` replays the dead-letter queue.
Nothing here imports aioboto3, the repository or the limiter: Lambda has boto3 only. This
module imports nothing, so `import zae_limiter.aggregator.snapshots` stays cheap.
"""
