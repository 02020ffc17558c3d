"""The standard library's ``multiprocessing.reduction``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.reduction is multiprocessing.reduction``.
"""

import multiprocessing.reduction as _module
import sys

sys.modules[__name__] = _module
