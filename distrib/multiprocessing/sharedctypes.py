"""The standard library's ``multiprocessing.sharedctypes``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.sharedctypes is multiprocessing.sharedctypes``.
"""

import multiprocessing.sharedctypes as _module
import sys

sys.modules[__name__] = _module
