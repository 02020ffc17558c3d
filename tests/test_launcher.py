"""distrib-run on one node: flags, worker environment, prefixed output, logs."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
from test_launcher_helpers import LauncherHarness

pytestmark = pytest.mark.timeout(60)

ENV_DUMP = """
    import json, os, sys
    keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
            "MASTER_ADDR", "MASTER_PORT", "DISTRIB_RUN_ID", "DISTRIB_RESTART_COUNT",
            "DISTRIB_MAX_RESTARTS", "DISTRIB_ERROR_FILE", "DISTRIB_LAUNCHER_PID",
            "PYTHONUNBUFFERED", "OMP_NUM_THREADS"]
    print("ENV " + json.dumps({k: os.environ.get(k) for k in keys} | {"argv": sys.argv}))
"""


@pytest.fixture
def launch(tmp_path):
    h = LauncherHarness(tmp_path)
    yield h
    h.cleanup()


def _envs(stdout: str) -> dict[int, dict]:
    out = {}
    for line in stdout.splitlines():
        m = re.fullmatch(r"\[(\d+)\]: ENV (.*)", line)
        if m:
            out[int(m.group(1))] = json.loads(m.group(2))
    return out


def test_worker_environment_and_rank_prefix(launch):
    script = launch.script("env.py", ENV_DUMP)
    r = launch.run("--nproc", "3", "--run-id", "job42", "--max-restarts", "2", script, "a", "--b")
    assert r.returncode == 0, r.stderr
    envs = _envs(r.stdout)
    assert sorted(envs) == [0, 1, 2]
    ports = {e["MASTER_PORT"] for e in envs.values()}
    assert len(ports) == 1 and int(ports.pop()) > 0
    for rank, e in envs.items():
        assert e["RANK"] == str(rank) and e["LOCAL_RANK"] == str(rank)
        assert e["WORLD_SIZE"] == "3" and e["LOCAL_WORLD_SIZE"] == "3" and e["GROUP_RANK"] == "0"
        assert e["MASTER_ADDR"] == "127.0.0.1"
        assert e["DISTRIB_RUN_ID"] == "job42"
        assert (e["DISTRIB_RESTART_COUNT"], e["DISTRIB_MAX_RESTARTS"]) == ("0", "2")
        assert e["DISTRIB_ERROR_FILE"].endswith(f"rank_{rank}.json")
        assert e["DISTRIB_LAUNCHER_PID"].isdigit()
        assert e["PYTHONUNBUFFERED"] == "1" and e["OMP_NUM_THREADS"] == "1"
        assert e["argv"] == [script, "a", "--b"]
    assert "OMP_NUM_THREADS=1" in r.stderr  # the one-line notice


def test_omp_threads_kept_when_set_and_no_notice_for_one_worker(launch):
    script = launch.script("env.py", ENV_DUMP)
    launch.env["OMP_NUM_THREADS"] = "3"
    r = launch.run("--nproc", "2", script)
    assert r.returncode == 0, r.stderr
    assert {e["OMP_NUM_THREADS"] for e in _envs(r.stdout).values()} == {"3"}
    assert "OMP_NUM_THREADS" not in r.stderr
    del launch.env["OMP_NUM_THREADS"]
    r = launch.run("--nproc", "1", script)
    assert _envs(r.stdout)[0]["OMP_NUM_THREADS"] is None and "OMP_NUM_THREADS" not in r.stderr


def test_master_port_given_and_standalone(launch):
    script = launch.script("env.py", ENV_DUMP)
    r = launch.run("--nproc", "2", "--master-addr", "127.0.0.1", "--master-port", "29999", script)
    assert {e["MASTER_PORT"] for e in _envs(r.stdout).values()} == {"29999"}
    r = launch.run("--standalone", "--nproc_per_node", "2", "--master-port", "29999", script)
    assert r.returncode == 0, r.stderr
    port = {e["MASTER_PORT"] for e in _envs(r.stdout).values()}
    assert len(port) == 1 and port != {"29999"}  # standalone always picks a free port


def test_two_jobs_on_one_host_get_different_ports(launch):
    # Rank 0 of each job binds MASTER_PORT (as torch's env:// does) and holds it until
    # both jobs are up: both succeed only if the launchers chose different ports.
    script = launch.script(
        "bind.py",
        """
        import os, socket, sys, time
        s = socket.socket()
        s.bind((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
        s.listen()
        open(sys.argv[1] + ".up", "w").write("up\\n")
        end = time.monotonic() + 20
        while not all(os.path.exists(n + ".up") for n in ("a", "b")):
            assert time.monotonic() < end, "the other job never came up"
            time.sleep(0.02)
        """,
    )
    a = launch.popen("--nproc", "1", script, "a")
    b = launch.popen("--nproc", "1", script, "b")
    outs = launch.finish_all([a, b], timeout=40)
    assert (a.returncode, b.returncode) == (0, 0), outs


def test_module_and_no_python(launch):
    pkg = launch.dir / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(
        "import os, sys\nprint('MOD', __name__, os.environ['RANK'], sys.argv[1:])\n"
    )
    r = launch.run("--nproc", "2", "-m", "mypkg.train", "x")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [
        "[0]: MOD __main__ 0 ['x']",
        "[1]: MOD __main__ 1 ['x']",
    ]
    sh = shutil.which("sh")
    r = launch.run("--nproc", "2", "--no-python", sh, "-c", 'echo "sh rank $RANK of $WORLD_SIZE"')
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["[0]: sh rank 0 of 2", "[1]: sh rank 1 of 2"]


def test_lines_never_interleave_and_partial_lines_are_flushed(launch):
    script = launch.script(
        "chatty.py",
        """
        import os, sys
        r = os.environ["RANK"]
        for i in range(1500):
            sys.stdout.write(f"rank{r}-line{i}-" + r * 300 + "\\n")
        sys.stdout.write("no newline at the end " + r)
        """,
    )
    # Unbuffered, the launcher's stdout is a raw FileIO whose writes SIGCHLD can cut short.
    launch.env["PYTHONUNBUFFERED"] = "1"
    r = launch.run("--nproc", "3", script)
    assert r.returncode == 0, r.stderr
    counts = {0: 0, 1: 0, 2: 0}
    for line in r.stdout.splitlines():
        m = re.fullmatch(r"\[(\d)\]: (?:rank(\d)-line\d+-(\d+)|no newline at the end (\d))", line)
        assert m, f"mangled line: {line[:120]!r}"
        rank = int(m.group(1))
        if m.group(2) is not None:
            assert int(m.group(2)) == rank and set(m.group(3)) == {str(rank)}
        else:
            assert int(m.group(4)) == rank
        counts[rank] += 1
    assert counts == {0: 1501, 1: 1501, 2: 1501}


def test_stderr_goes_to_stderr_and_no_prefix(launch):
    script = launch.script("err.py", "import sys\nprint('out')\nprint('err', file=sys.stderr)\n")
    r = launch.run("--nproc", "1", script)
    assert r.stdout == "[0]: out\n" and "[0]: err\n" in r.stderr
    r = launch.run("--nproc", "1", "--no-prefix", script)
    assert r.stdout == "out\n"


def test_log_dir_keeps_a_file_per_rank_and_attempt(launch):
    script = launch.script(
        "logs.py",
        """
        import os, sys, time
        rank, attempt = os.environ["RANK"], os.environ["DISTRIB_RESTART_COUNT"]
        print("out of", rank, "attempt", attempt)
        print("err of", rank, file=sys.stderr)
        open(f"{rank}.{attempt}", "w").close()  # a file barrier: fail only after both printed
        end = time.monotonic() + 20
        while not os.path.exists(f"0.{attempt}") or not os.path.exists(f"1.{attempt}"):
            assert time.monotonic() < end
            time.sleep(0.01)
        sys.exit(1 if attempt == "0" else 0)
        """,
    )
    logs = launch.dir / "logs"
    r = launch.run(
        "--nproc", "2", "--log-dir", str(logs), "--run-id", "L", "--max-restarts", "1", script
    )
    assert r.returncode == 0, r.stderr
    for attempt in (0, 1):
        for rank in (0, 1):
            d = logs / "L" / f"attempt_{attempt}" / str(rank)
            assert (d / "stdout.log").read_text() == f"out of {rank} attempt {attempt}\n"
            assert (d / "stderr.log").read_text() == f"err of {rank}\n"


def test_redirects_tee_and_local_ranks_filter(launch):
    script = launch.script(
        "both.py",
        "import os, sys\nr = os.environ['RANK']\nprint('O' + r)\nprint('E' + r, file=sys.stderr)\n",
    )
    logs = launch.dir / "logs"
    # rank 0's stdout only to its file; rank 1 untouched
    r = launch.run(
        "--nproc", "2", "--log-dir", str(logs), "--run-id", "R", "--redirects", "0:1", script
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[1]: O1\n" and "[0]: E0" in r.stderr
    assert (logs / "R" / "attempt_0" / "0" / "stdout.log").read_text() == "O0\n"
    # --redirects 3 for all, --tee 2 brings stderr back to the console
    r = launch.run("--nproc", "2", "--log-dir", str(logs), "--redirects", "3", "--tee", "2", script)
    assert r.stdout == "" and "[0]: E0" in r.stderr and "[1]: E1" in r.stderr
    # without --log-dir, --redirects writes to a fresh log directory it names
    r = launch.run("--nproc", "1", "--redirects", "1", script)
    m = re.search(r"logs of --redirects/--tee go to (\S+)", r.stderr)
    assert m and r.stdout == ""
    assert any(
        "O0" in (p.read_text()) for p in __import__("pathlib").Path(m.group(1)).rglob("stdout.log")
    )
    shutil.rmtree(m.group(1))
    r = launch.run("--nproc", "3", "--local-ranks-filter", "0,2", script)
    assert r.returncode == 0
    assert sorted(r.stdout.splitlines()) == ["[0]: O0", "[2]: O2"]
    assert "E1" not in r.stderr


def test_nproc_auto_and_gpu(launch):
    script = launch.script("one.py", "print('hi')\n")
    r = launch.run("--nproc", "auto", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("hi") == len(os.sched_getaffinity(0))
    launch.env["CUDA_VISIBLE_DEVICES"] = ""
    r = launch.run("--nproc", "gpu", script)
    assert r.returncode == 2 and "--nproc gpu: no visible GPU" in r.stderr
    launch.env["CUDA_VISIBLE_DEVICES"] = "0,1"  # counted, not used: workers print only
    r = launch.run("--nproc", "gpu", script)
    assert r.returncode == 0 and r.stdout.count("hi") == 2


def test_help_explains_every_flag(launch):
    r = launch.run("--help")
    assert r.returncode == 0
    for flag in (
        "--nproc",
        "--nproc-per-node",
        "--nnodes",
        "--node-rank",
        "--master-addr",
        "--master-port",
        "--standalone",
        "--max-restarts",
        "--monitor-interval",
        "--log-dir",
        "--redirects",
        "--tee",
        "--local-ranks-filter",
        "--run-id",
        "--timeout",
        "--auth-token-file",
        "--no-python",
        "--module",
    ):
        assert flag in r.stdout, flag


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc", "0"], "--nproc must be >= 1"),
        (["--nproc", "many"], "--nproc must be an integer, 'auto' or 'gpu'"),
        (
            ["--nnodes", "2", "--node-rank", "2", "--master-port", "1234"],
            "--node-rank must be in [0, 1]",
        ),
        (["--nnodes", "2"], "--master-port is required"),
        (["--nnodes", "1:4"], "(elastic) needs --rdzv-backend c10d"),
        (["--nproc", "2", "--redirects", "7"], "bad stream selector '7'"),
        (
            ["--nproc", "2", "--local-ranks-filter", "5"],
            "--local-ranks-filter names local rank(s) [5]",
        ),
        (["--max-restarts", "-1"], "--max-restarts must be >= 0"),
        (["--timeout", "0"], "--timeout must be > 0"),
        (["--monitor-interval", "0"], "--monitor-interval must be > 0"),
        (["--grace-period", "-1"], "--grace-period must be > 0"),
        (["--auth-token-file", "/nonexistent/token"], "--auth-token-file '/nonexistent/token'"),
    ],
)
def test_bad_arguments_are_named(launch, args, message):
    r = launch.run(*args, "x.py", timeout=30)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr


def test_unknown_distrib_variable_is_rejected(launch):
    launch.env["DISTRIB_TIMOUT"] = "5"
    r = launch.run("x.py", timeout=30)
    assert r.returncode == 2 and "DISTRIB_TIMOUT" in r.stderr


def test_python_api_launch(launch):
    import subprocess
    import sys

    script = launch.script("api.py", "import os\nprint('api rank', os.environ['RANK'])\n")
    code = (
        "import sys\nfrom launcher import LaunchOptions, launch\n"
        f"sys.exit(launch(LaunchOptions(target={script!r}, nproc=2, run_id='api')))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=launch.dir, env=launch.env, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["[0]: api rank 0", "[1]: api rank 1"]


def test_carriage_return_progress_shows_before_the_newline(launch):
    import select

    script = launch.script(
        "progress.py",
        """
        import os, sys, time
        sys.stdout.write("\\rstep 1/2")
        sys.stdout.write("\\rstep 2/2")  # no newline yet: a progress bar mid-flight
        end = time.monotonic() + 20
        while not os.path.exists("seen"):
            assert time.monotonic() < end, "the launcher never showed the progress line"
            time.sleep(0.01)
        print(" done")
        """,
    )
    p = launch.popen("--nproc", "1", script)
    seen, end = "", time.monotonic() + 20
    fd = p.stdout.fileno()
    while "[0]: step 1/2\r" not in seen and time.monotonic() < end:
        if select.select([fd], [], [], 0.1)[0]:
            seen += os.read(fd, 4096).decode()
    (launch.dir / "seen").write_text("")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert seen + out == "\r[0]: step 1/2\r[0]: step 2/2 done\n"


def test_multiprocessing_spawn_inside_a_worker(launch):
    # spawn re-imports the script through __main__.__file__: the bootstrap must set it
    # up as `python script.py` would.
    script = launch.script(
        "pool.py",
        """
        import multiprocessing as mp

        def square(x):
            return x * x

        if __name__ == "__main__":
            with mp.get_context("spawn").Pool(2) as pool:
                print(pool.map(square, range(5)))
        """,
    )
    r = launch.run("--nproc", "1", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[0]: [0, 1, 4, 9, 16]\n"
    assert "left processes" not in r.stderr


def test_write_all_survives_short_writes():
    # A non-blocking raw pipe takes at most its capacity (64 KiB) per write: short
    # writes are certain, and every byte must still arrive, in order.
    import io
    import threading

    from launcher._output import write_all

    r, w = os.pipe()
    os.set_blocking(w, False)
    payload = bytes(range(256)) * 4096  # 1 MiB
    received = bytearray()

    def drain():
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with io.FileIO(w, "wb") as raw:
        write_all(raw, payload)
    reader.join(timeout=30)
    os.close(r)
    assert not reader.is_alive() and bytes(received) == payload
