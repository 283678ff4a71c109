"""`zae_limiter.memory`, the earlier path of `zae_limiter.storage.memory`
(kept: documented in docs/api.md).

The same module object under both names, so patches and private names agree.
"""

import sys

from .storage import memory as _module
from .storage.memory import *  # noqa: F403

sys.modules[__name__] = _module
