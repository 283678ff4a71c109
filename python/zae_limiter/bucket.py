"""`zae_limiter.bucket`, the earlier path of `zae_limiter.core.bucket`
(kept: zae-limiter 0.2.0 had it).

The same module object under both names, so patches and private names agree.
"""

import sys

from .core import bucket as _module
from .core.bucket import *  # noqa: F403

sys.modules[__name__] = _module
