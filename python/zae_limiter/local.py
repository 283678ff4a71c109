"""`zae_limiter.local`, the earlier path of `zae_limiter.ops.local` (kept: the README and the
examples name it, and `python -m zae_limiter.local` runs the embedded server).

The same module object under both names, so patches and private names agree.
"""

import sys

from .ops import local as _module
from .ops.local import *  # noqa: F403

if __name__ == "__main__":
    _module.main()
else:
    sys.modules[__name__] = _module
