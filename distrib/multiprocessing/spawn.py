"""The standard library's ``multiprocessing.spawn``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.spawn is multiprocessing.spawn``.
"""

import multiprocessing.spawn as _module
import sys

sys.modules[__name__] = _module
