"""`zae_limiter.fastapi`, the earlier path of `zae_limiter.http.fastapi`
(kept: documented in docs/http.md).

The same module object under both names, so patches and private names agree.
"""

import sys

from .http import fastapi as _module
from .http.fastapi import *  # noqa: F403

sys.modules[__name__] = _module
