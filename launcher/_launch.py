"""``launch()``: run a job from Python, as ``distrib-run`` would from a shell."""

from __future__ import annotations

from ._options import LaunchOptions

__all__ = ["launch"]


def launch(options: LaunchOptions) -> int:
    """Run ``options``' job on this node until it ends; return the launcher's exit code.

    Installs signal handlers for SIGINT/SIGTERM/SIGHUP/SIGCHLD for the duration,
    so call it from the main thread.
    """
    from ._agent import Agent

    rendezvous = None
    if options.nnodes > 1:
        from ._multinode import StoreRendezvous

        rendezvous = StoreRendezvous(options)
    return Agent(options, rendezvous).run()
