"""The standard library's ``multiprocessing.managers``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.managers is multiprocessing.managers``.
"""

import multiprocessing.managers as _module
import sys

sys.modules[__name__] = _module
