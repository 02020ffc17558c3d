"""``python -m launcher``: the same as ``distrib-run``."""

import sys

from launcher._cli import main

sys.exit(main())
