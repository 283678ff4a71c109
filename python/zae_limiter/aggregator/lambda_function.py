"""Lambda entry module: the function's handler is `zae_limiter.aggregator.lambda_function.handler`
(a stable name for the deployment, whatever the handler's implementation module is called)."""

from zae_limiter.aggregator.handler import handler

__all__ = ["handler"]
