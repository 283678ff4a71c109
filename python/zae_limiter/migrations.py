"""`zae_limiter.migrations`, the earlier path of `zae_limiter.ops.migrations` (kept: zae-limiter
0.2.0 and docs/api.md name it), with its version modules.

The same module objects under both names, so patches and private names agree.
"""

import sys

from .ops import migrations as _module
from .ops.migrations import *  # noqa: F403
from .ops.migrations import v1_1_0, v1_2_0

sys.modules[__name__] = _module
for _version in (v1_1_0, v1_2_0):
    sys.modules[f"{__name__}.{_version.__name__.rpartition('.')[2]}"] = _version
