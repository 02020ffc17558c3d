"""CPython's multiprocessing suite under the 'spawn' start method (the stdlib's own wrapper, no test logic)."""

import unittest

import test._test_multiprocessing

test._test_multiprocessing.install_tests_in_module_dict(globals(), "spawn")

if __name__ == "__main__":
    unittest.main()
