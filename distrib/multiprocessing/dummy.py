"""The standard library's ``multiprocessing.dummy`` (and ``.dummy.connection``), under this name.

The same module objects, not copies: ``distrib.multiprocessing.dummy is multiprocessing.dummy``.
"""

import multiprocessing.dummy as _module
import multiprocessing.dummy.connection as _connection
import sys

sys.modules[__name__] = _module
sys.modules[__name__ + ".connection"] = _connection
