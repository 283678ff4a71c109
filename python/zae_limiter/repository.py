"""`zae_limiter.repository`, the earlier path of `zae_limiter.storage.dynamodb.repository`
(kept: zae-limiter 0.2.0 had it).

The same module object under both names, so patches and private names agree.
"""

import sys

from .storage.dynamodb import repository as _module
from .storage.dynamodb.repository import *  # noqa: F403

sys.modules[__name__] = _module
