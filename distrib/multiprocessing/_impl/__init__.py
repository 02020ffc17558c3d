"""How ``distrib.multiprocessing`` shares arrays: pickler, queues, pipe ends, contexts, spawn.

Kept in this subpackage so that the public package's folder holds exactly the
standard package's module names (CPython's own suite imports every ``*.py``
file it finds beside ``multiprocessing.__file__``).
"""
