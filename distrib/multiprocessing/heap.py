"""The standard library's ``multiprocessing.heap``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.heap is multiprocessing.heap``.
"""

import multiprocessing.heap as _module
import sys

sys.modules[__name__] = _module
