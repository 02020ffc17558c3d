"""Run distrib jobs on a Ray cluster: ranks placed, started, watched and restarted by Ray.

``distrib.ray.run(fn, num_workers=4)`` runs ``fn`` as the ranks of one job on
Ray actors; ``distrib-run --ray --nproc 4 train.py`` does the same for a script.
Needs ``pip install 'distrib[ray]'`` (Ray is imported only when a job starts).
"""

from ._run import PLACEMENTS, run

__all__ = ["PLACEMENTS", "run"]
