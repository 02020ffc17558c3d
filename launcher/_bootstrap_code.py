"""The one-line program each worker's interpreter runs (``python -c BOOTSTRAP_CODE``).

``python -m launcher._bootstrap`` would put the working directory first on
``sys.path`` before importing ``launcher``: a user's own ``launcher/`` or
``distrib/`` folder there would then shadow ours (``python train.py`` never
looks in the working directory unless the script lives there). ``-c`` adds the
working directory as ``''``; the code drops it before importing anything, and
the bootstrap later inserts the script's directory (or, for ``-m``, the working
directory) exactly as the interpreter would for ``python train.py``.
"""

from __future__ import annotations

__all__ = ["BOOTSTRAP_CODE"]

BOOTSTRAP_CODE = (
    "import sys\n"
    "if sys.path and sys.path[0] == '': del sys.path[0]\n"
    "from launcher._bootstrap import main\n"
    "main(sys.argv[1:])\n"
)
