"""Run CPython's multiprocessing suite for one start method; write each test's outcome as JSON.

    python run_suite.py METHOD OUT.json [TEST_ID ...]

With test ids (``test_multiprocessing_fork.WithProcessesTestQueue.test_put``),
only those run: how a failure is reproduced alone. Which ``multiprocessing``
runs is decided by PYTHONPATH (``alias/`` makes it ``distrib.multiprocessing``).
"""

from __future__ import annotations

import json
import signal
import sys
import time
import unittest


class _Recorder(unittest.TextTestResult):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, str] = {}
        self.seconds: dict[str, float] = {}  # how long each test took (CI time goes here)
        self._began = 0.0

    def startTest(self, test):
        self._began = time.monotonic()
        super().startTest(test)

    def stopTest(self, test):
        super().stopTest(test)
        self.seconds[test.id()] = round(time.monotonic() - self._began, 2)

    def addSuccess(self, test):
        super().addSuccess(test)
        self.outcomes[test.id()] = "passed"

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self.outcomes[test.id()] = "failed"

    def addError(self, test, err):
        super().addError(test, err)
        # setUpModule/tearDownModule errors have no test id of a test: keep them too
        self.outcomes[test.id()] = "error"

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self.outcomes[test.id()] = "skipped"

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self.outcomes[test.id()] = "passed"

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self.outcomes[test.id()] = "failed"

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self.outcomes[test.id()] = "failed"


def _module_name() -> str:
    import multiprocessing

    return multiprocessing.__name__


def _which_multiprocessing(method: str) -> list[str]:
    """The module ``import multiprocessing`` gives here and in a child of ``method``."""
    import multiprocessing

    ctx = multiprocessing.get_context(method)
    with ctx.Pool(1) as pool:
        child = pool.apply(_module_name)
    return [multiprocessing.__name__, child]


def _thread_pool_terminate_fix() -> None:
    """On Python < 3.13, run ``_TestPool.test_terminate`` as CPython 3.13 does.

    Before 3.13 its 10,000 tasks each sleep ``support.LONG_TIMEOUT`` (300 s) in
    every pool type. A thread pool cannot stop a worker thread that took a task
    before ``terminate()``, so whenever one wins that race the test waits 300 s,
    with the standard module as much as with distrib. 3.13 gives thread pools
    1 s tasks and lets a few tasks start first; process pools keep 300 s tasks.
    """
    if sys.version_info >= (3, 13):
        return
    from test import _test_multiprocessing as suite
    from test import support

    def test_terminate(self):
        seconds = 1 if self.TYPE == "threads" else support.LONG_TIMEOUT
        pool = self.Pool(3)
        pool.map_async(time.sleep, [seconds] * 10_000, chunksize=1)
        time.sleep(0.2)  # some tasks start before terminate()
        pool.terminate()
        pool.join()

    suite._TestPool.test_terminate = test_terminate


def main() -> int:
    method, out, *ids = sys.argv[1:]
    # Started from a shell's background job (``cmd &``), a process begins with
    # SIGINT ignored, and Python then keeps it ignored; the suite's tests send
    # SIGINT and expect KeyboardInterrupt (test_wait_result waited 60 s and
    # failed, under the standard module too). Interrupts raise, as in a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    module = f"test_multiprocessing_{method}"
    _thread_pool_terminate_fix()
    loader = unittest.TestLoader()
    suite = loader.loadTestsFromNames(ids) if ids else loader.loadTestsFromName(module)
    which = _which_multiprocessing(method)
    runner = unittest.TextTestRunner(resultclass=_Recorder, verbosity=1, stream=sys.stderr)
    result = runner.run(suite)
    with open(out, "w") as f:
        json.dump(
            {
                "multiprocessing": which,
                "loaded": suite.countTestCases(),
                "outcomes": result.outcomes,
                "seconds": result.seconds,
            },
            f,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
