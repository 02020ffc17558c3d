"""torchrun's command line on ``distrib-run``: the flags it has that ours lacks, and ``PET_*``.

``distrib-run`` accepts every flag of torchrun 2.13's ``--help`` in both
spellings (``--rdzv-backend`` / ``--rdzv_backend``) with torchrun's meaning.
Where a flag cannot mean anything here it is accepted and said so once on
stderr (``Notice``); a value that cannot work is refused with the reason.
Like torchrun, every flag's default can come from ``PET_<FLAG>`` (the
variables Kubeflow's PyTorchJob sets: ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, ``PET_RDZV_ENDPOINT`` ...).
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "RDZV_BACKENDS",
    "TorchrunSettings",
    "add_torchrun_flags",
    "apply_pet_defaults",
    "parse_nnodes",
    "parse_rdzv_conf",
    "torchrun_settings",
]

RDZV_BACKENDS = ("c10d", "static")
_START_METHODS = ("spawn", "fork", "forkserver")
_NUMA_MODES = ("node", "socket", "exclusive", "core-complex")
# Signals the agent forwards to its workers (launcher/_agent.py).
_FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP")
# torchrun's --rdzv-conf keys (DynamicRendezvousHandler, C10dRendezvousBackend).
_RDZV_CONF_KEYS = (
    "join_timeout",
    "last_call_timeout",
    "close_timeout",
    "read_timeout",
    "timeout",
    "is_host",
    "keep_alive_interval",
    "keep_alive_max_attempt",
    "heartbeat",
    "store_type",
    "use_libuv",
    "local_addr",
)


@dataclass
class TorchrunSettings:
    """What torchrun's extra flags mean for this launch (defaults: torchrun's)."""

    rdzv_backend: str = "static"
    rdzv_endpoint: str | None = None
    min_nodes: int = 1  # --nnodes MIN:MAX (MIN == MAX for a fixed size)
    max_nodes: int = 1
    role: str = "default"  # ROLE_NAME the workers see
    is_host: bool | None = None  # --rdzv-conf is_host: this launcher serves the c10d store
    last_call_timeout: float = 30.0  # c10d: wait this long for more nodes once MIN joined
    close_timeout: float = 30.0
    local_addr: str | None = None  # this node's address in the rendezvous
    virtual_local_rank: bool = False  # every worker sees LOCAL_RANK=0 and one GPU
    notices: list[str] = field(default_factory=list)  # said once on stderr


def add_torchrun_flags(p: argparse.ArgumentParser) -> None:
    """Add the torchrun flags that ``distrib-run``'s own parser does not define."""
    a = p.add_argument
    a(
        "--rdzv-backend",
        "--rdzv_backend",
        dest="rdzv_backend",
        default="static",
        help="how launchers meet: 'static' (--node-rank given; default) or 'c10d' (node ranks "
        "by join order, --nnodes MIN:MAX allowed). Other torchrun backends are refused.",
    )
    a(
        "--rdzv-endpoint",
        "--rdzv_endpoint",
        dest="rdzv_endpoint",
        default="",
        help="HOST[:PORT] where launchers meet (default port 29400 for c10d); replaces "
        "--master-addr/--master-port.",
    )
    a(
        "--rdzv-id",
        "--rdzv_id",
        dest="rdzv_id",
        default="none",
        help="job id shared by every node (same as --run-id).",
    )
    a(
        "--rdzv-conf",
        "--rdzv_conf",
        dest="rdzv_conf",
        default="",
        help="KEY=VALUE,...: join_timeout, last_call_timeout, close_timeout, read_timeout, "
        "timeout, is_host, keep_alive_interval, keep_alive_max_attempt.",
    )
    a(
        "--role",
        default="default",
        help="role name of the workers (their ROLE_NAME). Default 'default'.",
    )
    a(
        "--start-method",
        "--start_method",
        dest="start_method",
        default="spawn",
        choices=_START_METHODS,
        help="accepted for torchrun compatibility: workers are always fresh processes (spawn).",
    )
    a(
        "--event-log-handler",
        "--event_log_handler",
        dest="event_log_handler",
        default="null",
        help="accepted for torchrun compatibility; distrib-run reports on stderr instead.",
    )
    a(
        "--run-path",
        "--run_path",
        dest="run_path",
        action="store_true",
        help="run the script with runpy.run_path (what distrib-run always does for scripts); "
        "takes precedence over --no-python. The script path must be absolute.",
    )
    for stream in ("stdout", "stderr"):
        a(
            f"--duplicate-{stream}-filters",
            f"--duplicate_{stream}_filters",
            dest=f"duplicate_{stream}_filters",
            default=None,
            help=f"accepted for torchrun compatibility; use --log-dir/--tee for copies of {stream}.",
        )
    a(
        "--local-addr",
        "--local_addr",
        dest="local_addr",
        default=None,
        help="this node's address as the other nodes and the report name it.",
    )
    a(
        "--logs-specs",
        "--logs_specs",
        dest="logs_specs",
        default=None,
        help="accepted for torchrun compatibility: log layout is --log-dir's (no plug-ins).",
    )
    a(
        "--numa-binding",
        "--numa_binding",
        dest="numa_binding",
        default=None,
        choices=_NUMA_MODES,
        help="accepted for torchrun compatibility: workers are not pinned to NUMA nodes.",
    )
    a(
        "--signals-to-handle",
        "--signals_to_handle",
        dest="signals_to_handle",
        default="SIGTERM,SIGINT,SIGHUP,SIGQUIT",
        help="signals that stop the job, forwarded to the workers (SIGTERM, SIGINT, SIGHUP).",
    )
    a(
        "--shutdown-timeout",
        "--shutdown_timeout",
        dest="shutdown_timeout",
        type=float,
        default=None,
        help="seconds between SIGTERM and SIGKILL when stopping workers (same as "
        "--grace-period; default TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else --grace-period).",
    )
    a(
        "--virtual-local-rank",
        "--virtual_local_rank",
        dest="virtual_local_rank",
        action="store_true",
        help="every worker gets LOCAL_RANK=0 and sees only its own GPU as device 0.",
    )


def _pet_name(action: argparse.Action) -> str:
    """torchrun's ``PET_<DEST>`` name: the underscore spelling, upper case."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    pick = next((s for s in longs if "_" in s), longs[-1])
    return "PET_" + pick[2:].replace("-", "_").upper()


# torchrun's flags (dests of distrib-run's parser) that PET_* variables default.
TORCHRUN_DESTS = (
    "nnodes",
    "nproc",
    "rdzv_backend",
    "rdzv_endpoint",
    "rdzv_id",
    "rdzv_conf",
    "standalone",
    "max_restarts",
    "monitor_interval",
    "start_method",
    "event_log_handler",
    "role",
    "module",
    "no_python",
    "run_path",
    "log_dir",
    "redirects",
    "tee",
    "local_ranks_filter",
    "duplicate_stdout_filters",
    "duplicate_stderr_filters",
    "node_rank",
    "master_addr",
    "master_port",
    "local_addr",
    "logs_specs",
    "numa_binding",
    "signals_to_handle",
    "shutdown_timeout",
    "virtual_local_rank",
)


def _env_bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name}={raw!r} must be 1/0/true/false")


def apply_pet_defaults(p: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """Make ``PET_<FLAG>`` the default of each torchrun flag, as torchrun does."""
    env = os.environ if env is None else env
    for action in p._actions:
        if action.dest not in TORCHRUN_DESTS or not action.option_strings:
            continue
        name = _pet_name(action)
        if action.dest == "nproc":
            name = "PET_NPROC_PER_NODE"
        if name not in env:
            continue
        raw = env[name]
        if isinstance(action, argparse._StoreTrueAction):
            action.default = _env_bool(name, raw)
        elif action.choices is not None and raw not in action.choices:
            raise ValueError(f"{name}={raw!r}: expected one of {', '.join(action.choices)}")
        else:
            action.default = raw  # argparse applies the flag's type to string defaults
        action.required = False


def parse_nnodes(text: str) -> tuple[int, int]:
    """``N`` or ``MIN:MAX`` -> (min, max), torchrun's ``--nnodes``."""
    parts = str(text).split(":")
    try:
        if len(parts) == 1:
            lo = hi = int(parts[0])
        elif len(parts) == 2:
            lo, hi = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"--nnodes must be N or MIN:MAX (e.g. 2 or 1:4), got {text!r}") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"--nnodes {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def parse_rdzv_conf(text: str) -> dict[str, str]:
    """``key=value,key=value`` -> dict (torchrun's ``--rdzv-conf``)."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--rdzv-conf {text!r}: expected KEY=VALUE[,KEY=VALUE...]")
        out[key.strip()] = value.strip()
    return out


def _seconds(key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"--rdzv-conf {key}={raw!r}: expected seconds") from None
    if value <= 0:
        raise ValueError(f"--rdzv-conf {key}={raw!r}: must be > 0 seconds")
    return value


def _endpoint(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:  # no port, or a bare IPv6 address in brackets
        host, port = text, str(default_port)
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--rdzv-endpoint {text!r}: port must be an integer") from None
    if not host or not 0 <= number < 65536:
        raise ValueError(f"--rdzv-endpoint {text!r}: expected HOST[:PORT] with PORT in 0..65535")
    return host, number


def _signals(text: str) -> list[str]:
    names = []
    for raw in text.split(","):
        name = raw.strip().upper()
        if not name:
            continue
        if not name.startswith("SIG"):
            name = "SIG" + name
        if not hasattr(signal, name):
            raise ValueError(f"--signals-to-handle: unknown signal {raw.strip()!r}")
        names.append(name)
    return names


def torchrun_settings(
    ns: argparse.Namespace, env: Mapping[str, str] | None = None
) -> TorchrunSettings:
    """Check torchrun's extra flags in ``ns``, fold them into its other fields, return the rest.

    Updates ``ns`` in place where a torchrun flag sets one of distrib-run's own
    (``--rdzv-endpoint`` -> master address/port, ``--rdzv-id`` -> run id,
    ``--shutdown-timeout`` -> grace period, ``join_timeout`` -> join timeout ...).
    """
    env = os.environ if env is None else env
    s = TorchrunSettings(role=ns.role, virtual_local_rank=ns.virtual_local_rank)
    backend = str(ns.rdzv_backend).strip().lower()
    if backend not in RDZV_BACKENDS:
        raise ValueError(
            f"--rdzv-backend {ns.rdzv_backend!r} is not supported; distrib-run supports "
            f"{' and '.join(RDZV_BACKENDS)} (c10d: node ranks by join order, --nnodes MIN:MAX; "
            "static: --node-rank per node)"
        )
    s.rdzv_backend = backend
    for name in ("local_ranks_filter", "redirects", "tee", "log_dir"):
        if getattr(ns, name) == "":  # torchrun's empty defaults (e.g. from PET_*) mean unset
            setattr(ns, name, None)
    nproc = str(ns.nproc).strip().lower()
    if nproc == "cpu":  # torchrun's spelling of "one worker per CPU"
        ns.nproc = "auto"
    elif nproc == "xpu":
        raise ValueError(
            "--nproc-per-node xpu: Intel XPU devices are not supported here; use an integer, "
            "'auto'/'cpu' (one per CPU) or 'gpu' (one per visible CUDA GPU)"
        )
    if "\0" in s.role or "\n" in s.role:  # TorchX passes --role '' (torchrun takes any name)
        raise ValueError(f"--role must be one line of text, got {s.role!r}")
    if ns.nnodes is not None:
        s.min_nodes, s.max_nodes = parse_nnodes(ns.nnodes)
        ns.nnodes = str(s.max_nodes)
    if s.min_nodes != s.max_nodes and backend != "c10d" and not ns.standalone:
        raise ValueError(
            f"--nnodes {s.min_nodes}:{s.max_nodes} (elastic) needs --rdzv-backend c10d"
        )
    if ns.rdzv_endpoint and not ns.standalone:
        host, port = _endpoint(ns.rdzv_endpoint, 29400 if backend == "c10d" else 29500)
        if port == 0 and s.max_nodes > 1:  # TorchX's one-node form is localhost:0
            raise ValueError(
                f"--rdzv-endpoint {ns.rdzv_endpoint!r}: port 0 (any free port) only works for "
                "one node; several nodes must know where to meet"
            )
        s.rdzv_endpoint = f"{host}:{port}"
        ns.master_addr, ns.master_port = host, port
        if port == 0:  # one node, any free port: nobody else has to find it
            s.rdzv_backend, ns.master_port = "static", None
    if backend == "c10d" and not ns.standalone and not ns.rdzv_endpoint:
        if ns.master_port is None:
            raise ValueError(
                "--rdzv-backend c10d needs --rdzv-endpoint HOST[:PORT] (where the launchers meet)"
            )
        s.rdzv_endpoint = f"{ns.master_addr or '127.0.0.1'}:{ns.master_port}"
    if ns.rdzv_id not in (None, "", "none") and not ns.standalone and ns.run_id is None:
        ns.run_id = ns.rdzv_id
    conf = parse_rdzv_conf(ns.rdzv_conf)
    for key, raw in conf.items():
        if key == "join_timeout" or key == "timeout":
            ns.join_timeout = _seconds(key, raw)
        elif key == "last_call_timeout":
            s.last_call_timeout = _seconds(key, raw)
        elif key == "close_timeout":
            s.close_timeout = _seconds(key, raw)
        elif key == "read_timeout":
            ns.node_timeout = _seconds(key, raw)
        elif key == "is_host":
            s.is_host = _conf_bool(key, raw)
        elif key == "keep_alive_interval" or key == "keep_alive_max_attempt":
            continue  # folded below
        elif key in _RDZV_CONF_KEYS:
            s.notices.append(f"--rdzv-conf {key}={raw} has no effect here (accepted)")
        else:
            s.notices.append(
                f"--rdzv-conf {key}={raw} is not a key distrib-run knows (accepted, ignored); "
                f"known: {', '.join(_RDZV_CONF_KEYS)}"
            )
    if "keep_alive_interval" in conf or "keep_alive_max_attempt" in conf:
        interval = _seconds("keep_alive_interval", conf.get("keep_alive_interval", "5"))
        attempts = _seconds("keep_alive_max_attempt", conf.get("keep_alive_max_attempt", "3"))
        ns.node_timeout = interval * attempts  # torchrun declares a node dead after this
    if ns.local_addr:
        s.local_addr = ns.local_addr
    shutdown = ns.shutdown_timeout
    if shutdown is None and env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        try:
            shutdown = float(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
        except ValueError:
            raise ValueError(
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT="
                f"{env['TORCH_ELASTIC_SHUTDOWN_TIMEOUT']!r}: expected seconds"
            ) from None
    if shutdown is not None:
        if shutdown <= 0:
            raise ValueError(f"--shutdown-timeout must be > 0 seconds, got {shutdown}")
        ns.grace_period = shutdown
    if ns.run_path:
        if not os.path.isabs(ns.target):
            raise ValueError(f"--run-path needs an absolute script path, got {ns.target!r}")
        ns.no_python = ns.module = False  # torchrun: --run-path takes precedence
    if ns.start_method != "spawn":
        s.notices.append(
            f"--start-method {ns.start_method}: workers are always started as fresh "
            "processes (spawn); accepted"
        )
    if ns.event_log_handler not in (None, "", "null"):
        s.notices.append(
            f"--event-log-handler {ns.event_log_handler}: no event handlers here (the launcher "
            "reports on stderr); accepted"
        )
    for stream in ("stdout", "stderr"):
        if getattr(ns, f"duplicate_{stream}_filters"):
            s.notices.append(
                f"--duplicate-{stream}-filters: not supported here (use --log-dir/--tee); accepted"
            )
    if ns.logs_specs:
        s.notices.append(
            f"--logs-specs {ns.logs_specs}: no log plug-ins here (logs follow --log-dir); accepted"
        )
    if ns.numa_binding:
        s.notices.append(f"--numa-binding {ns.numa_binding}: workers are not NUMA-pinned; accepted")
    extra = [n for n in _signals(ns.signals_to_handle) if n not in _FORWARDED]
    if extra and ns.signals_to_handle != "SIGTERM,SIGINT,SIGHUP,SIGQUIT":
        s.notices.append(
            f"--signals-to-handle: {', '.join(extra)} are not handled here; "
            f"{', '.join(_FORWARDED)} stop the job and reach the workers"
        )
    return s


def _conf_bool(key: str, raw: str) -> bool:
    try:
        return _env_bool(f"--rdzv-conf {key}", raw)
    except ValueError:
        raise ValueError(f"--rdzv-conf {key}={raw!r}: expected 1/0/true/false") from None
