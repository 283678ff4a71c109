"""AWS Lambda entry point of the zae-limiter aggregator (handler lambda_function.handler)."""

from zae_limiter.aggregator.handler import handler  # noqa: F401
