"""Make ``import multiprocessing`` give ``distrib.multiprocessing`` in this interpreter.

Put this directory on PYTHONPATH and every process started from it (spawn and
forkserver children, the forkserver itself, subprocesses) gets the alias too.
The standard package is still loaded first, under its own name, so that its
submodules import relative to it; then the name is rebound. Nothing is
imported until the program imports ``multiprocessing`` itself.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``multiprocessing``; its loader returns ``distrib.multiprocessing``."""

    busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "multiprocessing" or self.busy:
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        return None  # a placeholder module, replaced in exec_module

    def exec_module(self, module):
        type(self).busy = True
        try:
            del sys.modules["multiprocessing"]  # the placeholder
            importlib.import_module("multiprocessing")  # the standard package, for real
            import distrib.multiprocessing as alias
        finally:
            type(self).busy = False
        # The import system re-reads sys.modules[name] after this returns.
        sys.modules["multiprocessing"] = alias


if "multiprocessing" in sys.modules:
    import distrib.multiprocessing

    sys.modules["multiprocessing"] = distrib.multiprocessing
else:
    sys.meta_path.insert(0, _AliasFinder())
