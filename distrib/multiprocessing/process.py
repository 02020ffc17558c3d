"""The standard library's ``multiprocessing.process``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.process is multiprocessing.process``.
"""

import multiprocessing.process as _module
import sys

sys.modules[__name__] = _module
