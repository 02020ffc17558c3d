"""The standard library's ``multiprocessing.popen_forkserver``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.popen_forkserver is multiprocessing.popen_forkserver``.
"""

import multiprocessing.popen_forkserver as _module
import sys

sys.modules[__name__] = _module
