"""Where a TCPStore's shared secret comes from when the caller passes none.

1. ``auth_token=`` (explicit), else ``DISTRIB_AUTH_TOKEN`` (``distrib-run`` sets
   it for its workers; with srun/mpirun/torchrun export it to every rank).
2. A store on a loopback address can only be reached from this host: the
   master writes a fresh random secret to a private per-user file
   (``<tmp>/distrib-<uid>/store-<port>.token``, directory 0700, file 0600) before
   it listens, and clients on this host read it after they connect.
3. Otherwise nothing secret is shared: the store runs unauthenticated and says
   so once per process (``RuntimeWarning``).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
import tempfile
import warnings

from .._config import config
from .._errors import DistStoreError

__all__ = [
    "explicit_secret",
    "is_loopback",
    "read_token_file",
    "remove_token_file",
    "shared_job_token",
    "write_token_file",
]

_warned = False


def explicit_secret(auth_token: str | bytes | None) -> bytes | None:
    """The secret from ``auth_token`` or ``DISTRIB_AUTH_TOKEN``, if either is set."""
    token = auth_token if auth_token is not None else config().auth_token
    if token is None or token in ("", b""):
        return None
    if isinstance(token, str):
        return token.encode()
    if isinstance(token, (bytes, bytearray, memoryview)):
        return bytes(token)
    raise TypeError(f"TCPStore: auth_token must be str or bytes, got {type(token).__name__}")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses no other host can reach."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _token_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), f"distrib-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DistStoreError(
            f"TCPStore: cannot create the private token directory {path}: {exc.strerror}; "
            "set DISTRIB_AUTH_TOKEN instead",
            op="store.auth",
        ) from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise DistStoreError(
            f"TCPStore: {path} is not a private directory of this user (owner uid {st.st_uid}, "
            f"mode {stat.S_IMODE(st.st_mode):o}); remove it or set DISTRIB_AUTH_TOKEN",
            op="store.auth",
        )
    return path


def token_path(port: int) -> str:
    return os.path.join(_token_dir(), f"store-{port}.token")


def write_token_file(port: int) -> tuple[bytes, str]:
    """A fresh secret for the store on ``port``, written where this user's clients find it."""
    secret = secrets.token_hex(32).encode()
    path = token_path(port)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, secret)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return secret, path


def read_token_file(port: int) -> bytes | None:
    """The secret the master on this host's ``port`` wrote, or ``None``."""
    try:
        fd = os.open(token_path(port), os.O_RDONLY | os.O_NOFOLLOW)
    except (OSError, DistStoreError):
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            return None
        data = os.read(fd, 1024).strip()
    finally:
        os.close(fd)
    return data or None


def shared_job_token(host: str, port: int) -> bytes:
    """One secret for every launcher of this user meeting at loopback ``host:port``.

    The first to come writes it (linked into place, so nobody reads half a file);
    the others read it. Only this user can read the private directory, and only
    this host can reach a loopback address, so several launchers on one machine
    (``--nnodes 2`` on 127.0.0.1) authenticate without a secret being passed.
    """
    path = os.path.join(_token_dir(), f"job-{host.strip('[]')}-{port}.token")
    secret = secrets.token_hex(32).encode()
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, secret)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another launcher of this job (or an earlier job of ours) came first
    finally:
        os.unlink(tmp)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        data = os.read(fd, 1024).strip()
    finally:
        os.close(fd)
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not data:
        raise DistStoreError(
            f"{path} is not a private, non-empty token file of this user; remove it, or "
            "pass --auth-token-file / set DISTRIB_AUTH_TOKEN",
            op="store.auth",
        )
    return data


def remove_token_file(path: str, secret: bytes) -> None:
    """Remove our token file (only if it still holds our secret)."""
    try:
        with open(path, "rb") as f:
            if f.read().strip() != secret:
                return
        os.unlink(path)
    except OSError:
        pass


def warn_unauthenticated(host: str, port: int) -> None:
    """Say once per process that this store accepts anyone who can reach it."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"the TCPStore at {host}:{port} is not authenticated: any process that can reach "
        "this address can read and change the job's rendezvous state. Set DISTRIB_AUTH_TOKEN "
        "to the same secret on every rank (distrib-run: --auth-token-file) to authenticate it.",
        RuntimeWarning,
        stacklevel=3,
    )
