"""The standard library's ``multiprocessing.util``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.util is multiprocessing.util``.
"""

import multiprocessing.util as _module
import sys

sys.modules[__name__] = _module
