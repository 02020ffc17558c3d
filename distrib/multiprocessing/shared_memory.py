"""The standard library's ``multiprocessing.shared_memory``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.shared_memory is multiprocessing.shared_memory``.
"""

import multiprocessing.shared_memory as _module
import sys

sys.modules[__name__] = _module
