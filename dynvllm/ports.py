"""Ports chosen now for a process that binds them later (an engine, seconds after we pick)."""

from __future__ import annotations

import socket


def reserve_ports(count: int = 1, host: str = "0.0.0.0") -> tuple[int, list[socket.socket]]:
    """Ports P .. P+count-1, held until the sockets returned are closed.

    Each is bound (never listening) with SO_REUSEADDR: no connect() takes it as its ephemeral
    port and no bind() without that option gets it, yet ZMQ, which sets it, binds it. A port
    found free and let go is free only until some outgoing connection takes it, and on a busy
    host one did before the engine bound it: the engine died at start with "Address already in
    use"."""
    for _ in range(100):
        held: list[socket.socket] = []
        try:
            for i in range(count):
                s = socket.socket()
                held.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, held[0].getsockname()[1] + i if i else 0))
            return held[0].getsockname()[1], held
        except OSError:
            for s in held:
                s.close()
    raise RuntimeError(f"no run of {count} free ports on {host}")


#: Ports held for as long as this process lives (its engines bind them).
_FOR_PROCESS: list[socket.socket] = []


def reserve_for_process(host: str = "0.0.0.0") -> int:
    """A port held until this process exits, for an engine it starts (see `reserve_ports`)."""
    port, held = reserve_ports(1, host)
    _FOR_PROCESS.extend(held)
    return port
