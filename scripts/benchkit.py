"""What the side-by-side benchmark scripts share: a free port, waiting for a server they started,
and stopping it with everything it started (engine processes included)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    port: int,
    proc: subprocess.Popen,
    timeout: float = 300,
    path: str = "/health",
    ready: Callable[[bytes], bool] = lambda body: True,
) -> None:
    """Until GET `path` answers 200 with a body `ready` accepts; a server that exits fails at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200 and ready(r.read()):
                    return
        except Exception:
            pass  # not listening yet, or answering 503 while workers register
        time.sleep(0.5)
    raise RuntimeError("server did not start")


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the server's process group (it drains and stops its children), then SIGKILL to
    whatever of the group is left."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
