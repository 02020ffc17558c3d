"""The standard library's ``multiprocessing.pool``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.pool is multiprocessing.pool``.
"""

import multiprocessing.pool as _module
import sys

sys.modules[__name__] = _module
