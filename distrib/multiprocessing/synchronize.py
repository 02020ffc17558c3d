"""The standard library's ``multiprocessing.synchronize``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.synchronize is multiprocessing.synchronize``.
"""

import multiprocessing.synchronize as _module
import sys

sys.modules[__name__] = _module
