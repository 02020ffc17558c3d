"""``distrib-run`` command line: torchrun's everyday flags, parsed into ``LaunchOptions``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from distrib._config import config
from distrib._errors import DistError

from ._options import LaunchOptions, parse_nproc, parse_rank_set, parse_std_streams
from ._slurm import slurm_step
from ._torchrun_flags import add_torchrun_flags, apply_pet_defaults, torchrun_settings

__all__ = ["build_parser", "main", "options_from_args"]

_DESCRIPTION = """\
Start NPROC copies of a Python script (or module, or program) on this node, as
ranks of one distributed job, and watch them: every output line is prefixed with
its rank, a failure stops the whole job with a report naming the failed rank and
its traceback, and no worker outlives the launcher.

examples:
  distrib-run --nproc 4 train.py --epochs 3
  distrib-run --nproc auto -m mypkg.train
  distrib-run --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 \
      --auth-token-file ~/.distrib-token train.py
  distrib-run --ray --nproc 8 train.py          # on the Ray cluster of RAY_ADDRESS
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by ``--help``)."""
    p = argparse.ArgumentParser(
        prog="distrib-run",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    a = p.add_argument
    a(
        "--nproc",
        "--nproc-per-node",
        "--nproc_per_node",
        dest="nproc",
        default="1",
        help="workers on this node: an integer, 'auto' (one per CPU) or 'gpu' (one per "
        "visible GPU). Default 1.",
    )
    a(
        "--nnodes",
        default=None,
        help="number of nodes (launchers) in the job; each runs distrib-run with its own "
        "--node-rank. Default 1, or under 'srun --ntasks-per-node=1' the step's node "
        "count (with --node-rank, --master-addr and --master-port from Slurm too).",
    )
    a(
        "--node-rank",
        "--node_rank",
        dest="node_rank",
        type=int,
        default=0,
        help="this node's index, 0..nnodes-1. Default 0.",
    )
    a(
        "--master-addr",
        "--master_addr",
        dest="master_addr",
        default=None,
        help="address of node 0, reachable from every node; workers get it as MASTER_ADDR. "
        "Default 127.0.0.1.",
    )
    a(
        "--master-port",
        "--master_port",
        dest="master_port",
        type=int,
        default=None,
        help="single node: the MASTER_PORT workers get (default: a free port, so two jobs "
        "never collide). Several nodes: the port where the launchers meet (required); "
        "node 0 then picks a free MASTER_PORT for the workers.",
    )
    a(
        "--standalone",
        action="store_true",
        help="single-node job on 127.0.0.1 with a free port (overrides --nnodes/--master-*).",
    )
    a(
        "--max-restarts",
        "--max_restarts",
        dest="max_restarts",
        type=int,
        default=0,
        help="restart the whole group up to N times after a failure (DISTRIB_RESTART_COUNT "
        "counts them). Failures before the script started are not retried. Default 0.",
    )
    a(
        "--monitor-interval",
        "--monitor_interval",
        dest="monitor_interval",
        type=float,
        default=0.1,
        help="seconds between checks of timeouts and other nodes (worker exits are seen at "
        "once). Default 0.1.",
    )
    a(
        "--log-dir",
        "--log_dir",
        dest="log_dir",
        default=None,
        help="also write each rank's stdout/stderr to LOG_DIR/RUN_ID/attempt_K/RANK/.",
    )
    a(
        "-r",
        "--redirects",
        default=None,
        help="keep streams off the console (log files only): 1 stdout, 2 stderr, 3 both; "
        "for all local ranks ('3') or per rank ('0:3,1:1').",
    )
    a(
        "-t",
        "--tee",
        default=None,
        help="write streams to the console and to log files: same values as --redirects.",
    )
    a(
        "--local-ranks-filter",
        "--local_ranks_filter",
        dest="local_ranks_filter",
        default=None,
        help="only these local ranks reach the console, e.g. '0' or '0,2-3' (logs keep all).",
    )
    a(
        "--run-id",
        "--run_id",
        dest="run_id",
        default=None,
        help="job id (DISTRIB_RUN_ID); names the log directory. Default: random.",
    )
    a(
        "--timeout",
        type=float,
        default=None,
        help="stop the whole job with a report when an attempt runs longer than this many "
        "seconds (catches hangs). Default: no limit.",
    )
    a(
        "--grace-period",
        dest="grace_period",
        type=float,
        default=5.0,
        help="seconds between SIGTERM and SIGKILL when stopping workers. Default 5.",
    )
    a(
        "--node-timeout",
        dest="node_timeout",
        type=float,
        default=30.0,
        help="several nodes: seconds without news from another node's launcher before it "
        "counts as lost and the job stops. Default 30.",
    )
    a(
        "--join-timeout",
        dest="join_timeout",
        type=float,
        default=300.0,
        help="several nodes: seconds to wait for every node's launcher to join (at the start "
        "and at each restart). Default 300.",
    )
    a(
        "--auth-token-file",
        dest="auth_token_file",
        default=None,
        help="file holding the job's shared secret, which authenticates the store that "
        "launchers and workers meet at (default: DISTRIB_AUTH_TOKEN). Required with --nnodes > 1 "
        "unless --insecure-store; one node makes a fresh secret per job by itself. Workers get "
        "it as DISTRIB_AUTH_TOKEN.",
    )
    a(
        "--insecure-store",
        "--insecure_store",
        dest="insecure_store",
        action="store_true",
        help="with --nnodes > 1 and no shared secret: run the job's store without "
        "authentication (anyone who can reach --master-addr:--master-port can read and forge "
        "the job's state). Never needed on one node.",
    )
    a(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the NPROC workers (in all) on a Ray cluster at ADDRESS, or RAY_ADDRESS, or "
        "else on a new local Ray instance (auto: the one running here); Ray places them. Needs pip install 'distrib[ray]'.",
    )
    a(
        "--no-prefix",
        dest="prefix",
        action="store_false",
        help="do not prefix worker output lines with '[RANK]: '.",
    )
    add_torchrun_flags(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "-m", "--module", action="store_true", help="run the target as a module, like 'python -m'."
    )
    g.add_argument(
        "--no-python",
        "--no_python",
        dest="no_python",
        action="store_true",
        help="run the target as an executable, not through Python.",
    )
    a("target", help="the script (or module / program) every worker runs")
    a("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return p


def _apply_slurm(ns: argparse.Namespace) -> str | None:
    """Fill unset multi-node flags from a Slurm step; return a notice, or ``None``."""
    step = slurm_step(os.environ)
    if step is None or ns.standalone or ns.nnodes is not None:
        return None
    ns.nnodes = str(step.nnodes)
    ns.node_rank = step.node_rank
    if ns.master_addr is None:
        ns.master_addr = step.master_addr
    if ns.master_port is None and step.nnodes > 1:
        ns.master_port = step.master_port
    return (
        f"Slurm step: node {ns.node_rank} of {ns.nnodes}, launchers meet at "
        f"{ns.master_addr}:{ns.master_port}"
    )


def options_from_args(ns: argparse.Namespace) -> LaunchOptions:
    """Turn parsed arguments into validated ``LaunchOptions`` (``ValueError`` if bad)."""
    compat = torchrun_settings(ns)  # torchrun's flags; folds --rdzv-* etc. into ns
    nnodes = int(ns.nnodes) if ns.nnodes is not None else 1
    nproc = parse_nproc(ns.nproc)
    opts = LaunchOptions(
        target=ns.target,
        args=list(ns.args),
        nproc=nproc,
        nnodes=nnodes,
        node_rank=ns.node_rank,
        master_addr=ns.master_addr or "127.0.0.1",
        master_port=ns.master_port,
        module=ns.module,
        no_python=ns.no_python,
        max_restarts=ns.max_restarts,
        monitor_interval=ns.monitor_interval,
        log_dir=ns.log_dir,
        timeout=ns.timeout,
        grace_period=ns.grace_period,
        node_timeout=ns.node_timeout,
        join_timeout=ns.join_timeout,
        prefix_output=ns.prefix,
        insecure_store=ns.insecure_store,
    )
    opts.torchrun = compat
    if ns.standalone:
        opts.nnodes, opts.node_rank = 1, 0
        compat.rdzv_backend, compat.min_nodes, compat.max_nodes = "static", 1, 1
        opts.master_addr, opts.master_port = "127.0.0.1", None
    if ns.run_id is not None:
        opts.run_id = ns.run_id
    if ns.redirects is not None:
        opts.redirects = parse_std_streams(ns.redirects, nproc)
    if ns.tee is not None:
        opts.tee = parse_std_streams(ns.tee, nproc)
    if ns.local_ranks_filter is not None:
        opts.local_ranks_filter = parse_rank_set(ns.local_ranks_filter)
    if ns.auth_token_file is not None:
        try:
            with open(ns.auth_token_file, encoding="utf-8") as f:
                opts.auth_token = f.read().strip()
        except OSError as exc:
            raise ValueError(f"--auth-token-file {ns.auth_token_file!r}: {exc.strerror}") from None
        if not opts.auth_token:
            raise ValueError(f"--auth-token-file {ns.auth_token_file!r} is empty")
        if os.stat(ns.auth_token_file).st_mode & 0o077:
            print(
                f"distrib-run: warning: --auth-token-file {ns.auth_token_file} is readable by "
                "other users; chmod 600 it",
                file=sys.stderr,
            )
    else:
        opts.auth_token = config().auth_token or None
    opts.validate()
    return opts


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``distrib-run``; returns the process exit code."""
    from ._ray import split_ray_address

    parser = build_parser()
    try:
        apply_pet_defaults(parser)  # torchrun's PET_<FLAG> environment defaults
    except ValueError as exc:
        parser.error(str(exc))
    ns = parser.parse_args(split_ray_address(sys.argv[1:] if argv is None else list(argv)))
    if ns.ray is not None:
        from ._ray import main_ray

        return main_ray(parser, ns)
    notice = _apply_slurm(ns)
    if notice is not None:
        print(f"distrib-run: {notice}", file=sys.stderr)
    try:
        opts = options_from_args(ns)
    except (ValueError, DistError) as exc:
        parser.error(str(exc))
    for note in opts.torchrun.notices:
        print(f"distrib-run: {note}", file=sys.stderr)
    from ._agent import Agent

    rendezvous: Any = None
    if opts.torchrun.rdzv_backend == "c10d" and not ns.standalone:
        from ._elastic import ElasticRendezvous

        rendezvous = ElasticRendezvous(opts)
    elif opts.nnodes > 1:
        from ._multinode import StoreRendezvous

        try:
            rendezvous = StoreRendezvous(opts)
        except DistError as exc:
            print(f"distrib-run: node {opts.node_rank}: {exc}", file=sys.stderr)
            return 1
    return Agent(opts, rendezvous).run()
