"""The job's store, hosted by ``distrib-run`` itself so it outlives every worker.

As torch's elastic agent does, the launcher (node 0's, across nodes) serves the
store the workers' ``init_process_group`` meets at, so when rank 0 dies the
survivors can still read why the job failed. Workers find it through
``DISTRIB_STORE_ADDR`` (``MASTER_ADDR``/``MASTER_PORT`` stay free for rank 0 of a
torch script) and use a key prefix per attempt, so a restart starts clean.

The store is authenticated by default: one node makes a fresh secret per job
and hands it to its workers as ``DISTRIB_AUTH_TOKEN``; several nodes must share
one (``--auth-token-file`` or ``DISTRIB_AUTH_TOKEN``) unless ``--insecure-store``.
"""

from __future__ import annotations

import secrets

from ._options import MISSING_SECRET, LaunchOptions

__all__ = ["JobStore"]


class JobStore:
    """The store this launcher hosts (one node) or joins (several: node 0's launchers' store)."""

    def __init__(self, opts: LaunchOptions) -> None:
        if opts.auth_token is None and not opts.insecure_store:
            if opts.nnodes > 1:
                raise ValueError(MISSING_SECRET.format(nnodes=opts.nnodes))
            opts.auth_token = secrets.token_hex(32)  # handed to the workers, never printed
        self._server = None
        if opts.nnodes > 1:
            # Node 0's launcher already serves the launchers' store; workers use it too.
            self.address = f"{opts.master_addr}:{opts.master_port}"
            return
        from distrib._errors import DistStoreError
        from distrib.store._server import StoreServer

        secret = opts.auth_token.encode() if opts.auth_token else None
        try:
            self._server = StoreServer(opts.master_addr, 0, secret)
        except DistStoreError as exc:
            raise DistStoreError(
                f"--master-addr {opts.master_addr}: cannot serve the job's store there "
                f"({exc}); on one node it must be an address of this host (default 127.0.0.1)",
                op="launcher.store",
            ) from None
        self._server.start()
        self.address = f"{opts.master_addr}:{self._server.port}"

    def worker_env(self, attempt: int, membership: int) -> dict[str, str]:
        """Where the workers' ``init_process_group`` finds the store, and their key prefix:
        one per attempt and elastic round, so a re-formed world starts clean."""
        return {
            "DISTRIB_STORE_ADDR": self.address,
            "DISTRIB_STORE_PREFIX": f"/worker/attempt_{attempt}/round_{membership}",
        }

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
