"""The standard library's ``multiprocessing.resource_sharer``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.resource_sharer is multiprocessing.resource_sharer``.
"""

import multiprocessing.resource_sharer as _module
import sys

sys.modules[__name__] = _module
