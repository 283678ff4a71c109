"""`zae_limiter.asgi`, the earlier path of `zae_limiter.http.asgi`
(kept: documented in docs/http.md).

The same module object under both names, so patches and private names agree.
"""

import sys

from .http import asgi as _module
from .http.asgi import *  # noqa: F403

sys.modules[__name__] = _module
