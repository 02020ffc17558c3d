"""Helpers to test code that runs on several ranks: start N local ranks (in one
process group, or in none for code that makes its own), collect each rank's
result or failure, and pick ports that do not collide. Used by distrib's own
test suite and ``distrib-bench``; usable in yours.
"""

from __future__ import annotations

from ._ports import free_port
from ._ranks import Outcome, RankResult, StartMethod, run_local_ranks

__all__ = ["Outcome", "RankResult", "StartMethod", "free_port", "run_local_ranks"]
