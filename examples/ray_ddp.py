"""``ddp_digits``' data-parallel training, with the ranks placed and run by Ray.

The training is ``examples/ddp_digits.py``'s, unchanged (same model, sampler,
DDP and optimizer, same global batch), so 4 Ray workers reach the accuracy of
``distrib-run --nproc 4 examples/ddp_digits.py`` (and of one process with the
same global batch, up to float rounding).

    python examples/ray_ddp.py                      # RAY_ADDRESS's cluster, or a local Ray
    python examples/ray_ddp.py --workers 8 --placement SPREAD --epochs 30

Other flags are ddp_digits' (``--epochs``, ``--batch-size``, ``--lr`` ...). The
exit status is 0 when the test accuracy reaches ``--target`` (default 0.95).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cloudpickle
import ddp_digits

import distrib
import distrib.ray

# Ship ddp_digits' code with the function, so the cluster's nodes need only distrib.
cloudpickle.register_pickle_by_value(ddp_digits)


def rank_main(args: argparse.Namespace) -> float:
    """One rank: join the job Ray placed us in, train, return the test accuracy."""
    distrib.init_process_group()  # RANK, WORLD_SIZE, MASTER_ADDR ... come from distrib.ray
    try:
        return ddp_digits.train(args)
    finally:
        distrib.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    ap.add_argument("--workers", type=int, default=4, help="Ray workers (ranks). Default 4.")
    ap.add_argument("--placement", default="PACK", help="PACK, SPREAD, STRICT_PACK, STRICT_SPREAD")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up after this many s")
    ours, rest = ap.parse_known_args(argv)
    args: Any = ddp_digits.parse_args(rest)  # every other flag is ddp_digits'
    accs = distrib.ray.run(
        rank_main,
        num_workers=ours.workers,
        placement=ours.placement,
        args=(args,),
        env={"OMP_NUM_THREADS": "1"},  # one BLAS thread per rank, as distrib-run sets
        timeout=ours.timeout,
    )
    assert len(set(accs)) == 1, f"ranks disagree: {accs}"  # the replicas stay identical
    print(f"{ours.workers} Ray workers, test accuracy: {accs[0]:.4f}")
    return 0 if accs[0] >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
