"""`zae_limiter.transport`, the earlier path of `zae_limiter.storage.dynamodb.transport`
(kept: documented in the README).

The same module object under both names, so patches and private names agree.
"""

import sys

from .storage.dynamodb import transport as _module
from .storage.dynamodb.transport import *  # noqa: F403

sys.modules[__name__] = _module
