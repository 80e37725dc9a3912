"""Where each `dynvllm serve` records its NATS address, so a second terminal finds the service.

One record per `serve` process (`services/<pid>.json` under the state folder), so services on
one host never overwrite each other's. A command that is not told which service to use takes
the only one there is (of its namespace, when one was given); with several it lists them and
asks, rather than picking one silently. A record whose `serve` or NATS is gone is stale: it is
reported, and never chosen.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dynvllm.runtime.nats import server_urls

#: Seconds to wait for a recorded NATS to accept a connection before the record counts as stale.
PROBE_TIMEOUT = 0.5


def state_dir() -> Path:
    base = os.environ.get("DYN_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "dynvllm"
    )
    return Path(base)


def _services() -> Path:
    return state_dir() / "services"


def _file(pid: int) -> Path:
    return _services() / f"{pid}.json"


@dataclass(frozen=True)
class Record:
    namespace: str
    nats_url: str
    pid: int
    http_port: int | None = None
    started: float = 0.0
    #: Why the record cannot be used ("" when it can): its `serve` or its NATS is gone.
    stale: str = ""

    def describe(self) -> str:
        http = f"http port {self.http_port}" if self.http_port else "no frontend"
        state = f"  STALE: {self.stale}" if self.stale else ""
        return f"namespace {self.namespace}  {self.nats_url}  {http}  (serve pid {self.pid}){state}"


def record(namespace: str, **info: object) -> Path:
    """Record this process's service (one file per `serve` process)."""
    path = _file(os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "namespace": namespace, "pid": os.getpid(), "started": time.time()}))
    tmp.replace(path)
    return path


def forget(namespace: str | None = None) -> None:
    """Remove this process's record."""
    try:
        _file(os.getpid()).unlink()
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's (a pid reused since)
        return True
    return True


def nats_reachable(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the first server of a NATS URL accepts a TCP connection."""
    first = urlsplit(server_urls(url)[0])
    try:
        with socket.create_connection((first.hostname or "127.0.0.1", first.port or 4222), timeout):
            return True
    except OSError:
        return False


def records(probe: bool = True) -> list[Record]:
    """Every recorded service of this host, oldest first, each marked stale or not. Records of
    `serve` processes that are gone are removed once read (they cannot come back)."""
    out = []
    for path in sorted(_services().glob("*.json")) if _services().is_dir() else []:
        try:
            info = json.loads(path.read_text())
            rec = Record(
                str(info["namespace"]),
                str(info["nats_url"]),
                int(info["pid"]),
                int(info["http_port"]) if info.get("http_port") else None,
                float(info.get("started") or 0),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not _pid_alive(rec.pid):
            rec = _stale(rec, f"its serve (pid {rec.pid}) is gone")
            try:
                path.unlink()
            except OSError:
                pass
        elif probe and not nats_reachable(rec.nats_url):
            rec = _stale(rec, f"nothing answers at {rec.nats_url}")
        out.append(rec)
    return sorted(out, key=lambda r: r.started)


def _stale(rec: Record, why: str) -> Record:
    return Record(rec.namespace, rec.nats_url, rec.pid, rec.http_port, rec.started, why)


def lookup(namespace: str) -> dict | None:
    """The one live service of `namespace` on this host, as a dict; None if none or several."""
    live = [r for r in records() if not r.stale and r.namespace == namespace]
    if len(live) != 1:
        return None
    r = live[0]
    return {"namespace": r.namespace, "nats_url": r.nats_url, "http_port": r.http_port, "pid": r.pid}


def resolve(explicit: str | None, namespace: str, namespace_given: bool) -> tuple[str, str]:
    """(NATS URL, namespace) of the service a command talks to.

    An explicit URL wins; its namespace is the given one, else that of the one live record with
    that URL. Otherwise the only live record (of the namespace, when one was given); none or
    several is a LookupError whose message lists what this host has.
    """
    if explicit:
        if not namespace_given:
            same = {r.namespace for r in records(probe=False) if r.nats_url == explicit}
            if len(same) == 1:
                return explicit, same.pop()
        return explicit, namespace
    every = records()
    live = [r for r in every if not r.stale]
    chosen = [r for r in live if r.namespace == namespace] if namespace_given else live
    if len(chosen) == 1:
        return chosen[0].nats_url, chosen[0].namespace
    listing = "".join(f"\n  {r.describe()}" for r in every)
    if len(chosen) > 1:
        raise LookupError(
            f"{len(chosen)} services run on this machine"
            + (f" in namespace {namespace!r}" if namespace_given else "")
            + ": pass --nats-url"
            + ("" if namespace_given else " or --namespace")
            + f" to say which:{listing}"
        )
    where = f"in namespace {namespace!r} " if namespace_given else ""
    msg = (
        f"no service {where}runs on this machine: pass --nats-url (or set DYN_NATS_URL), or start "
        "one with `dynvllm serve`"
    )
    raise LookupError(msg + (f"; recorded services:{listing}" if every else ""))


def resolve_nats_url(explicit: str | None, namespace: str) -> str:
    """The NATS URL of `namespace`'s service (see `resolve`)."""
    return resolve(explicit, namespace, True)[0]
