"""Build the optional C extension of the shared-memory engine's small all-reduce.

Everything else is in pyproject.toml. ``optional=True``: without a C compiler (or
Python's headers) the install still succeeds and the engine keeps its Python path.
"""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux"):
    extensions.append(
        Extension(
            "distrib.transport.shm._oneshot",
            sources=["distrib/transport/shm/_oneshot.c"],
            extra_compile_args=["-O2", "-ffp-contract=off"],
            optional=True,
        )
    )

setup(ext_modules=extensions)
