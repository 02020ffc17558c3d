"""The standard library's ``multiprocessing.popen_spawn_posix``, reachable under this package's name.

The same module object, not a copy: ``distrib.multiprocessing.popen_spawn_posix is multiprocessing.popen_spawn_posix``.
"""

import multiprocessing.popen_spawn_posix as _module
import sys

sys.modules[__name__] = _module
