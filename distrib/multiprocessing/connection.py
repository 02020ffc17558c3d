"""The standard library's ``multiprocessing.connection``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.connection is multiprocessing.connection``.
"""

import multiprocessing.connection as _module
import sys

sys.modules[__name__] = _module
