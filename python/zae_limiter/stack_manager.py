"""`zae_limiter.stack_manager`, the earlier path of `zae_limiter.ops.stacks`
(kept: documented in docs/compatibility.md).

The same module object under both names, so patches and private names agree.
"""

import sys

from .ops import stacks as _module
from .ops.stacks import *  # noqa: F403

sys.modules[__name__] = _module
