"""zae-limiter 0.2.0's import path of `StackManager` (`zae_limiter.stack_manager`).

Not imported by `zae_limiter.infra`: it needs aioboto3, which the aggregator Lambda lacks.
"""

from __future__ import annotations

from ..stack_manager import StackManager

__all__ = ["StackManager"]
