"""Child-process hygiene: no process dynvllm starts may outlive the process that started it."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

log = logging.getLogger("dynvllm.process")
_PR_SET_PDEATHSIG = 1
_SOCKET_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


def child_preexec() -> None:
    """Run in a child before exec: die with SIGTERM when the parent dies (Linux), own group."""
    os.setpgrp()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def become_group_leader() -> None:
    """Lead a process group so every engine process we spawn can be killed as one group.

    A process started from an interactive shell already leads its job's group; changing it
    would detach it from the terminal's Ctrl-C, so only processes that don't lead one move.
    """
    if os.getpgrp() != os.getpid():
        try:
            os.setpgrp()
        except OSError:
            pass


def start_group_reaper() -> subprocess.Popen | None:
    """Start a watcher that SIGKILLs our process group once we are gone, however we died.

    vLLM's engine processes survive an abrupt exit of their parent (SIGKILL, os._exit) and keep
    their ports; the watcher holds the read end of a pipe whose write end only we hold, so
    end-of-file means we died, and it then kills every process left in our group.
    """
    if os.getpgrp() != os.getpid():
        return None
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpgrp())],
        stdin=read_fd,
        start_new_session=True,
        close_fds=True,
    )
    os.close(read_fd)
    os.set_inheritable(write_fd, False)
    _keep.append(write_fd)
    return proc


_keep: list[int] = []
_REAPER = """
import os, signal, sys
pgid = int(sys.argv[1])
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
try:
    while os.read(0, 1024):
        pass
except OSError:
    pass
try:
    os.killpg(pgid, signal.SIGKILL)
except OSError:
    pass
"""


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the child, wait, then SIGKILL whatever is left of the group it leads."""
    if proc.poll() is not None:
        _kill_group(proc.pid)
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(proc.pid)
    proc.wait()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # every process of the group is gone already
    except OSError as exc:
        log.warning("cannot kill what is left of process group %d: %s", pgid, exc)


@contextlib.contextmanager
def private_ipc_dir() -> Iterator[None]:
    """A folder of this process's own for its engines' IPC sockets, removed when it ends.

    vLLM makes its engines' ZMQ IPC sockets under VLLM_RPC_BASE_PATH (the temp folder) and
    leaves them there when the engine stops: 7 socket files per engine start on vLLM 0.26, with
    `vllm serve` as with us. A user who set VLLM_RPC_BASE_PATH keeps their choice, and where the
    temp folder's path is too long for a socket name below a folder of ours, vLLM's default
    stays."""
    if os.environ.get("VLLM_RPC_BASE_PATH"):
        yield
        return
    path = tempfile.mkdtemp(prefix="dynvllm-ipc-")
    if len(path) + 1 + 36 > _SOCKET_PATH_MAX:  # vLLM names each socket by a uuid4
        os.rmdir(path)
        yield
        return
    os.environ["VLLM_RPC_BASE_PATH"] = path
    try:
        yield
    finally:
        os.environ.pop("VLLM_RPC_BASE_PATH", None)
        shutil.rmtree(path, ignore_errors=True)
