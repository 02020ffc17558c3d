"""The standard library's ``multiprocessing.context``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.context is multiprocessing.context``.
"""

import multiprocessing.context as _module
import sys

sys.modules[__name__] = _module
