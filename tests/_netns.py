"""Two test "hosts": Linux network namespaces joined by a veth pair.

Each namespace gets one address from the benchmarking range 198.18.0.0/15 (and
no other address is ever used). Namespace and link names carry this process's
pid plus a random tag, so concurrent runs never collide; everything is removed
even when the test fails. Without root or iproute2 the test is skipped with the
reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

ADDR = ("198.18.0.1", "198.18.0.2")
PORT = "29400"  # a fresh namespace has no other listener: any fixed port is free there


def ip(*args: str) -> None:
    """Run ``ip ARGS`` (bounded), raising on failure."""
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@contextmanager
def two_hosts(prefix: str) -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
    """Create two namespaces joined by a veth pair; yield (namespaces, links); remove them.

    ``prefix`` is one letter naming the caller, so two test files never share names.
    """
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("needs the 'ip' and 'unshare' tools (iproute2, util-linux)")
    tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:3]}"  # <= 15 chars per link name
    ns = (f"d{prefix}{tag}a", f"d{prefix}{tag}b")
    links = (f"dv{prefix}{tag}a", f"dv{prefix}{tag}b")
    made: list[str] = []
    try:
        for name in ns:
            ip("netns", "add", name)
            made.append(name)
    except (subprocess.CalledProcessError, OSError) as exc:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for name, link, addr in zip(ns, links, ADDR, strict=True):
            ip("link", "set", link, "netns", name)
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", link)
            ip("-n", name, "link", "set", link, "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield ns, links
    finally:
        for name in ns:  # deleting a namespace also deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


@contextmanager
def bridged_hosts(prefix: str, count: int) -> Iterator[tuple[list[str], list[str]]]:
    """``count`` namespaces on one bridge (in a switch namespace of its own, no address).

    Host i gets 198.18.0.<i+1>/24. Yields (namespaces, addresses); removes everything.
    """
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("needs the 'ip' and 'unshare' tools (iproute2, util-linux)")
    tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:3]}"
    switch = f"d{prefix}{tag}s"
    names = [f"d{prefix}{tag}{i}" for i in range(count)]
    addrs = [f"198.18.0.{i + 1}" for i in range(count)]
    made: list[str] = []
    try:
        for name in [switch, *names]:
            ip("netns", "add", name)
            made.append(name)
    except (subprocess.CalledProcessError, OSError) as exc:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for i, (name, addr) in enumerate(zip(names, addrs, strict=True)):
            host_end, switch_end = f"dv{prefix}{tag}{i}h", f"dv{prefix}{tag}{i}s"
            ip("link", "add", host_end, "type", "veth", "peer", "name", switch_end)
            ip("link", "set", host_end, "netns", name)
            ip("link", "set", switch_end, "netns", switch)
            ip("-n", switch, "link", "set", switch_end, "master", "br0")
            ip("-n", switch, "link", "set", switch_end, "up")
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", host_end)
            ip("-n", name, "link", "set", host_end, "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield names, addrs
    finally:
        for name in made:  # deleting a namespace deletes its veth ends and the bridge
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
