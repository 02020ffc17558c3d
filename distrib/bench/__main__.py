"""``python -m distrib.bench``: the same as the ``distrib-bench`` command."""

from ._cli import main

main()
