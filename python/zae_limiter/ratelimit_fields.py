"""`zae_limiter.ratelimit_fields`, the earlier path of `zae_limiter.http.fields`
(kept: documented in docs/http.md).

The same module object under both names, so patches and private names agree.
"""

import sys

from .http import fields as _module
from .http.fields import *  # noqa: F403

sys.modules[__name__] = _module
