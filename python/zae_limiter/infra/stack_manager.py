"""`zae_limiter.infra.stack_manager`, zae-limiter 0.2.0's path of `zae_limiter.ops.stacks`
(kept for its users).

The same module object under both names. Not imported by `zae_limiter.infra`: it needs aioboto3,
which the aggregator Lambda lacks.
"""

import sys

from ..ops import stacks as _module
from ..ops.stacks import *  # noqa: F403

sys.modules[__name__] = _module
