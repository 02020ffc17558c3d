"""Every flag of torchrun 2.13's command line, on distrib-run: its meaning, or a stated refusal.

The list of flags comes from torchrun's own parser (``torch.distributed.run.
get_args_parser``), so a flag torchrun has and this table lacks fails the test.
Each row runs distrib-run with the flag; the worker prints what it sees
(environment, which program ran), and the row checks the effect; flags that
cannot mean anything here must print their notice on stderr and still run.
Also: ``PET_*`` variables alone configure two distrib-runs on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from _util import free_port
from test_launcher_helpers import LauncherHarness

from launcher._cli import build_parser

pytestmark = [pytest.mark.timeout(120)]

try:
    from torch.distributed.run import get_args_parser
except ImportError:  # CI installs torch==2.13.0 (CPU)
    get_args_parser = None  # type: ignore[assignment]

SHOW = """
    import json, os, sys
    keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_NAME",
            "MASTER_ADDR", "MASTER_PORT", "DISTRIB_RUN_ID", "DISTRIB_MAX_RESTARTS",
            "CUDA_VISIBLE_DEVICES"]
    seen = {k: os.environ.get(k) for k in keys}
    seen["name"] = __name__
    seen["argv"] = sys.argv[1:]
    print("SEEN " + json.dumps(seen, sort_keys=True), flush=True)
"""


def _torchrun_actions() -> dict[str, list[str]]:
    if get_args_parser is None:
        pytest.fail("needs torch 2.13.0 (CPU) for torchrun's parser: pip install torch==2.13.0")
    return {
        a.dest: list(a.option_strings)
        for a in get_args_parser()._actions
        if a.option_strings and a.dest != "help"
    }


@dataclass
class Row:
    """How one torchrun flag is exercised: its arguments and what must follow."""

    args: Callable[[LauncherHarness], list[str]]
    check: Callable[[list[dict], str, LauncherHarness], None]
    target: str = "show.py"
    notice: str | None = None  # a flag without meaning here: its stderr notice
    extra_env: dict[str, str] = field(default_factory=dict)


def _all(key: str, value: object) -> Callable[[list[dict], str, LauncherHarness], None]:
    def check(seen: list[dict], err: str, h: LauncherHarness) -> None:
        assert seen and all(s[key] == value for s in seen), (key, value, seen)

    return check


def _ran(seen: list[dict], err: str, h: LauncherHarness) -> None:
    assert len(seen) == 1 and seen[0]["name"] == "__main__", seen


def _endpoint(h: LauncherHarness) -> str:
    return f"127.0.0.1:{free_port()}"


def _c10d(h: LauncherHarness, *more: str) -> list[str]:
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", _endpoint(h), *more]


def _log_has(seen: list[dict], err: str, h: LauncherHarness) -> None:
    logs = [p for p in (h.dir / "logs").rglob("stdout.log")]
    assert logs and "SEEN" in logs[0].read_text(), logs


def _redirected(seen: list[dict], err: str, h: LauncherHarness) -> None:
    assert seen == []  # nothing on the console
    _log_has([], err, h)


def _virtual(seen: list[dict], err: str, h: LauncherHarness) -> None:
    assert sorted((s["LOCAL_RANK"], s["CUDA_VISIBLE_DEVICES"]) for s in seen) == [
        ("0", "0"),
        ("0", "1"),
    ]


def _filtered(seen: list[dict], err: str, h: LauncherHarness) -> None:
    assert [s["LOCAL_RANK"] for s in seen] == ["1"]


PORT = free_port()

ROWS: dict[str, Row] = {
    "nnodes": Row(
        lambda h: ["--nnodes", "1:2", *_c10d(h), "--rdzv-conf", "last_call_timeout=0.3"],
        _all("GROUP_WORLD_SIZE", "1"),  # MIN=1 joined, last call passed: a group of one
    ),
    "nproc_per_node": Row(lambda h: ["--nproc-per-node", "2"], _all("WORLD_SIZE", "2")),
    "rdzv_backend": Row(lambda h: _c10d(h), _all("GROUP_RANK", "0")),
    "rdzv_endpoint": Row(
        lambda h: ["--rdzv-endpoint", f"127.0.0.1:{PORT}"], _all("MASTER_PORT", str(PORT))
    ),
    "rdzv_id": Row(lambda h: ["--rdzv-id", "job-42"], _all("DISTRIB_RUN_ID", "job-42")),
    "rdzv_conf": Row(
        lambda h: [
            "--nnodes",
            "1:3",
            *_c10d(h),
            "--rdzv-conf",
            "join_timeout=20,last_call_timeout=0.2,foo=1",
        ],
        _all("GROUP_WORLD_SIZE", "1"),
        notice="--rdzv-conf foo=1 is not a key distrib-run knows",
    ),
    "standalone": Row(lambda h: ["--standalone"], _all("MASTER_ADDR", "127.0.0.1")),
    "max_restarts": Row(lambda h: ["--max-restarts", "2"], _all("DISTRIB_MAX_RESTARTS", "2")),
    "monitor_interval": Row(lambda h: ["--monitor-interval", "0.5"], _ran),
    "start_method": Row(
        lambda h: ["--start-method", "fork"], _ran, notice="always started as fresh processes"
    ),
    "event_log_handler": Row(
        lambda h: ["--event-log-handler", "console"], _ran, notice="no event handlers here"
    ),
    "role": Row(lambda h: ["--role", "trainer"], _all("ROLE_NAME", "trainer")),
    "module": Row(lambda h: ["-m", "showmod"], _all("name", "__main__"), target=""),
    "no_python": Row(
        lambda h: ["--no-python", sys.executable, str(h.dir / "show.py")],
        _all("argv", []),
        target="",
    ),
    "run_path": Row(lambda h: ["--run-path"], _ran, target="ABS"),
    "log_dir": Row(lambda h: ["--log-dir", str(h.dir / "logs")], _log_has),
    "redirects": Row(lambda h: ["-r", "3", "--log-dir", str(h.dir / "logs")], _redirected),
    "tee": Row(lambda h: ["-t", "1", "--log-dir", str(h.dir / "logs")], _log_has),
    "local_ranks_filter": Row(
        lambda h: ["--nproc-per-node", "2", "--local-ranks-filter", "1"], _filtered
    ),
    "duplicate_stdout_filters": Row(
        lambda h: ["--duplicate-stdout-filters", "loss"], _ran, notice="--log-dir/--tee"
    ),
    "duplicate_stderr_filters": Row(
        lambda h: ["--duplicate-stderr-filters", "warn"], _ran, notice="--log-dir/--tee"
    ),
    "node_rank": Row(lambda h: ["--nnodes", "1", "--node-rank", "0"], _all("GROUP_RANK", "0")),
    "master_addr": Row(lambda h: ["--master-addr", "localhost"], _all("MASTER_ADDR", "localhost")),
    "master_port": Row(lambda h: ["--master-port", str(PORT)], _all("MASTER_PORT", str(PORT))),
    "local_addr": Row(
        lambda h: [*_c10d(h), "--local-addr", "localhost"], _all("MASTER_ADDR", "localhost")
    ),
    "logs_specs": Row(lambda h: ["--logs-specs", "default"], _ran, notice="no log plug-ins"),
    "numa_binding": Row(lambda h: ["--numa-binding", "node"], _ran, notice="not NUMA-pinned"),
    "signals_to_handle": Row(
        lambda h: ["--signals-to-handle", "SIGTERM,SIGUSR1"], _ran, notice="SIGUSR1 are not handled"
    ),
    "shutdown_timeout": Row(lambda h: ["--shutdown-timeout", "2"], _ran),
    "virtual_local_rank": Row(
        lambda h: ["--nproc-per-node", "2", "--virtual-local-rank"], _virtual
    ),
}

# Values that cannot work are refused with the reason (exit 2), never "unrecognized".
REFUSED = [
    (["--rdzv-backend", "etcd"], "supports c10d and static"),
    (["--nproc-per-node", "xpu"], "XPU devices are not supported"),
    (["--rdzv-backend", "c10d"], "needs --rdzv-endpoint"),
    (["--nnodes", "1:2"], "needs --rdzv-backend c10d"),
    (["--nnodes", "3:2"], "1 <= MIN <= MAX"),
    (["--rdzv-conf", "join_timeout"], "expected KEY=VALUE"),
    (["--rdzv-conf", "join_timeout=soon"], "join_timeout='soon': expected seconds"),
    (["--rdzv-endpoint", "host:port"], "port must be an integer"),
    (["--start-method", "thread"], "invalid choice: 'thread'"),
    (["--numa-binding", "everywhere"], "invalid choice: 'everywhere'"),
    (["--signals-to-handle", "SIGNOPE"], "unknown signal 'SIGNOPE'"),
    (["--shutdown-timeout", "0"], "--shutdown-timeout must be > 0"),
    (["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"], "port 0"),
]


@pytest.fixture
def launch(tmp_path):
    h = LauncherHarness(tmp_path)
    h.script("show.py", SHOW)
    h.script("showmod.py", SHOW)
    h.env["PYTHONPATH"] = str(tmp_path) + os.pathsep + h.env["PYTHONPATH"]
    yield h
    h.cleanup()


def test_table_covers_every_torchrun_flag():
    assert set(_torchrun_actions()) == set(ROWS)


def test_every_torchrun_spelling_is_accepted():
    parser = build_parser()
    ours = {s for a in parser._actions for s in a.option_strings}
    missing = sorted(s for opts in _torchrun_actions().values() for s in opts if s not in ours)
    assert missing == []


@pytest.mark.parametrize("dest", sorted(ROWS))
def test_flag_has_torchrun_meaning(launch, dest):
    row = ROWS[dest]
    target = {"show.py": "show.py", "": None, "ABS": str(launch.dir / "show.py")}[row.target]
    args = [*row.args(launch), *([target] if target else [])]
    r = launch.run(*args, timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [
        json.loads(line.split("SEEN ", 1)[1]) for line in r.stdout.splitlines() if "SEEN " in line
    ]
    row.check(seen, r.stderr, launch)
    if row.notice is not None:
        assert r.stderr.count(row.notice) == 1, r.stderr  # said once
    assert "unrecognized" not in r.stderr


@pytest.mark.parametrize("dest", sorted(ROWS))
def test_underscore_spelling_means_the_same(dest):
    opts = _torchrun_actions()[dest]
    parser = build_parser()
    by_string = {s: a.dest for a in parser._actions for s in a.option_strings}
    assert len({by_string[s] for s in opts}) == 1, opts


@pytest.mark.parametrize(("args", "message"), REFUSED)
def test_values_that_cannot_work_are_refused_with_the_reason(launch, args, message):
    r = launch.run(*args, "show.py", timeout=30)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr, r.stderr
    assert "unrecognized" not in r.stderr


def test_nproc_per_node_cpu_is_one_worker_per_cpu(launch):
    r = launch.run("--nproc-per-node", "cpu", "show.py", timeout=90)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("SEEN ") == len(os.sched_getaffinity(0))


def test_run_path_needs_an_absolute_path(launch):
    r = launch.run("--run-path", "show.py", timeout=30)
    assert r.returncode == 2 and "--run-path needs an absolute script path" in r.stderr


# -- PET_* variables: torchrun's environment defaults (Kubeflow's PyTorchJob) ----------

ALL_REDUCE = """
    import numpy as np
    import distrib.comm as dist

    dist.init_process_group()
    x = np.full(3, float(dist.get_rank() + 1))
    dist.all_reduce(x)
    print(f"RESULT {dist.get_rank()} {dist.get_world_size()} {x[0]:g}", flush=True)
    dist.destroy_process_group()
"""


def _pet_pair(launch, per_node: Callable[[int], dict[str, str]]) -> list[str]:
    script = launch.script("ar.py", ALL_REDUCE)
    base = dict(launch.env)
    procs = []
    for node in (0, 1):
        launch.env = {**base, **per_node(node)}
        procs.append(launch.popen(script))  # no flags at all
    launch.env = base
    results = launch.finish_all(procs, timeout=90)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    return sorted(
        line.split("]: ", 1)[1] for _, out, _ in results for line in out.splitlines() if "RESULT" in line
    )  # fmt: skip


def test_two_launchers_from_pet_variables_alone(launch):
    port = str(free_port())
    lines = _pet_pair(
        launch,
        lambda n: {
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "2",
            "PET_NODE_RANK": str(n),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": port,
        },
    )
    assert lines == [f"RESULT {r} 4 10" for r in range(4)]


def test_two_launchers_from_pet_rdzv_variables(launch):
    endpoint = f"127.0.0.1:{free_port()}"
    lines = _pet_pair(
        launch,
        lambda n: {
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "1",
            "PET_RDZV_BACKEND": "c10d",
            "PET_RDZV_ENDPOINT": endpoint,
            "PET_RDZV_ID": "k8s-job",
            "PET_RDZV_CONF": f"is_host={1 - n}",
        },
    )
    assert lines == ["RESULT 0 2 3", "RESULT 1 2 3"]


def test_empty_pet_values_mean_unset(launch):
    for name in ("PET_LOCAL_RANKS_FILTER", "PET_RDZV_ENDPOINT", "PET_RDZV_CONF", "PET_REDIRECTS"):
        launch.env[name] = ""
    r = launch.run("show.py", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("SEEN ") == 1


def test_command_line_wins_over_pet(launch):
    launch.env["PET_NPROC_PER_NODE"] = "3"
    launch.env["PET_ROLE"] = "from-env"
    r = launch.run("--nproc-per-node", "1", "show.py", timeout=60)
    assert r.returncode == 0, r.stderr
    seen = [json.loads(x.split("SEEN ", 1)[1]) for x in r.stdout.splitlines() if "SEEN " in x]
    assert [(s["WORLD_SIZE"], s["ROLE_NAME"]) for s in seen] == [("1", "from-env")]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PET_NPROC_PER_NODE", "lots", "--nproc must be an integer"),
        ("PET_STANDALONE", "maybe", "PET_STANDALONE='maybe' must be 1/0/true/false"),
        ("PET_START_METHOD", "thread", "PET_START_METHOD='thread': expected one of"),
        ("PET_RDZV_BACKEND", "etcd-v2", "supports c10d and static"),
    ],
)
def test_bad_pet_value_is_named(launch, name, value, message):
    launch.env[name] = value
    r = launch.run("show.py", timeout=30)
    assert r.returncode == 2 and message in r.stderr, r.stderr
