"""The wrappers here are CPython's suite, run by tests/test_cpython_multiprocessing.py in
subprocesses; pytest does not collect them itself."""

collect_ignore_glob = ["test_multiprocessing_*.py", "alias/*"]
