"""The standard library's ``multiprocessing.forkserver``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.forkserver is multiprocessing.forkserver``.
"""

import multiprocessing.forkserver as _module
import sys

sys.modules[__name__] = _module
