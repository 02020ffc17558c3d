"""The standard library's ``multiprocessing.popen_spawn_win32``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.popen_spawn_win32 is multiprocessing.popen_spawn_win32``.
"""

import multiprocessing.popen_spawn_win32 as _module
import sys

sys.modules[__name__] = _module
