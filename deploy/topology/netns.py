"""Hosts on one machine: a network namespace per host, each with a veth
pair into one bridge in the root namespace, on a private /24. Nothing
leaves this machine: the namespaces have no route but the bridge's subnet.

Every name carries ``PREFIX`` so that ``teardown`` can find what an
earlier, interrupted run left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

PREFIX = "hto-"
BRIDGE = f"{PREFIX}br"
SUBNET = "10.77.0"  # .1 is the root namespace's end of the bridge
GATEWAY = f"{SUBNET}.1"


def ip(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def namespaces() -> list[str]:
    """Our namespaces that exist now."""
    return [line.split()[0] for line in ip("netns", "list").splitlines()
            if line.split() and line.split()[0].startswith(PREFIX)]


def subnet_in_use() -> bool:
    """Some interface outside our bridge already holds an address of the subnet."""
    for line in ip("-o", "-4", "addr", "show").splitlines():
        fields = line.split()
        if f" {SUBNET}." in f" {line}" and fields[1] != BRIDGE:
            return True
    return False


def make_bridge() -> None:
    if subnet_in_use():
        raise RuntimeError(f"{SUBNET}.0/24 is already used on this machine; tear that down first")
    ip("link", "add", BRIDGE, "type", "bridge")
    ip("addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")


def add_client_addresses(addresses: list[str]) -> None:
    """More addresses on the root namespace's end of the bridge: clients
    that bind to them reach nginx as that many different client addresses."""
    for address in addresses:
        ip("addr", "add", f"{address}/32", "dev", BRIDGE)


def veth_of(ns: str) -> str:
    """The root namespace's end of the host's link."""
    return f"{ns}-v"[:15]


def add_host(name: str, address: str) -> str:
    """A namespace ``PREFIX + name`` whose eth0 has ``address`` on the bridge."""
    ns = PREFIX + name
    veth = veth_of(ns)
    ip("netns", "add", ns)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip("link", "set", veth, "master", BRIDGE, "up")
    ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
    ip("-n", ns, "link", "set", "eth0", "up")
    ip("-n", ns, "link", "set", "lo", "up")
    return ns


def pids(ns: str) -> list[int]:
    out = ip("netns", "pids", ns, check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def kill_all(ns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in ``ns`` and wait until none is left (bounded)."""
    deadline = time.monotonic() + timeout
    while (left := pids(ns)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)  # other processes exiting: nothing to await
    if pids(ns):
        raise RuntimeError(f"processes of {ns} did not die: {pids(ns)}")


def remove_host(ns: str) -> None:
    """Kill what runs in ``ns``, then delete it and its link. The link is
    deleted by name: a namespace outlives its name while closed TCP
    connections of its dead processes still retransmit."""
    kill_all(ns)
    ip("netns", "del", ns, check=False)
    ip("link", "del", veth_of(ns), check=False)


def teardown() -> None:
    """Every namespace, link and the bridge of ours, whatever state they are
    in. All processes die first, while the links still carry their last
    packets between the hosts."""
    hosts = namespaces()
    for ns in hosts:
        kill_all(ns)
    for ns in hosts:
        remove_host(ns)
    for line in ip("-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(PREFIX) and name != BRIDGE:
            ip("link", "del", name, check=False)
    ip("link", "del", BRIDGE, check=False)
