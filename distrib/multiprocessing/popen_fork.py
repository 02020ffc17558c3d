"""The standard library's ``multiprocessing.popen_fork``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.popen_fork is multiprocessing.popen_fork``.
"""

import multiprocessing.popen_fork as _module
import sys

sys.modules[__name__] = _module
