"""The standard library's ``multiprocessing.resource_tracker``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.resource_tracker is multiprocessing.resource_tracker``.
"""

import multiprocessing.resource_tracker as _module
import sys

sys.modules[__name__] = _module
