"""Hosts for multi-host tests: Linux network namespaces joined by veth pairs through a bridge.

Each host has its own interfaces, address and ports; the test process reaches them through one
more veth pair of its own. `cut()` takes a host off the network (its link goes down, so packets
are dropped, not refused, as when a machine vanishes) and `restore()` brings it back.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import random
import subprocess

_made = itertools.count()  # networks made by this process: each gets names of its own


class NamespacesUnavailable(RuntimeError):
    pass


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise NamespacesUnavailable(f"ip {' '.join(args)}: {res.stderr.strip()}")


class Network:
    """A bridge in a namespace of its own, hosts around it, and this process attached to it."""

    def __init__(self) -> None:
        self.tag = f"dv{os.getpid() % 100000}n{next(_made)}"
        # A /24 in 10.200-249.x that no route of this machine uses.
        taken = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        while True:
            self.net = ipaddress.ip_network(f"10.{random.randint(200, 249)}.{random.randint(0, 255)}.0/24")
            if str(self.net.network_address)[:-1] not in taken:
                break
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, str] = {}  # name -> address
        self._made: list[str] = []
        self._own_link = f"{self.tag}-me"
        try:
            _ip("netns", "add", self.switch)
            self._made.append(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            # This process's own way in: the last address of the network.
            me = str(self.net.broadcast_address - 1)
            _ip("link", "add", self._own_link, "type", "veth", "peer", "name", "p-me", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", "p-me", "master", "br0", "up")
            _ip("addr", "add", f"{me}/{self.net.prefixlen}", "dev", self._own_link)
            _ip("link", "set", self._own_link, "up")
        except Exception:
            self.close()
            raise

    def host(self, name: str) -> str:
        """A new host: its namespace, one interface on the bridge, loopback up. Its address."""
        ns = f"{self.tag}-{name}"
        addr = str(self.net.network_address + len(self.hosts) + 1)
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip(
            "-n", self.switch, "link", "add", f"p-{name}", "type", "veth", "peer", "name", "eth0", "netns", ns
        )
        _ip("-n", self.switch, "link", "set", f"p-{name}", "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{addr}/{self.net.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.hosts[name] = addr
        return addr

    def prefix(self, name: str) -> list[str]:
        """The command prefix that runs a program on host `name`."""
        return ["ip", "netns", "exec", f"{self.tag}-{name}"]

    def cut(self, name: str) -> None:
        _ip("-n", self.switch, "link", "set", f"p-{name}", "down")

    def restore(self, name: str) -> None:
        _ip("-n", self.switch, "link", "set", f"p-{name}", "up")

    def close(self) -> None:
        """Deletes every namespace (their veth ends go with them, and so do the peers)."""
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()
        subprocess.run(["ip", "link", "del", self._own_link], capture_output=True, timeout=30)


def available() -> str | None:
    """None when this machine lets the test make namespaces; else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (or CAP_NET_ADMIN)"
    try:
        Network().close()
    except (NamespacesUnavailable, FileNotFoundError, OSError) as exc:
        return f"cannot create network namespaces here: {exc}"
    return None
