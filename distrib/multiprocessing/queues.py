"""The standard library's ``multiprocessing.queues``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.queues is multiprocessing.queues``.
"""

import multiprocessing.queues as _module
import sys

sys.modules[__name__] = _module
