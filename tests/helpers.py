"""Process helpers for end-to-end tests: start dynvllm commands, wait, and prove cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import psutil

from dynvllm.process import child_preexec  # own group, and SIGTERM if the test runner dies

ENGINE_ARGS = ["--enforce-eager", "--kv-cache-memory-bytes", str(128 << 20), "--block-size", "32"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A dynvllm command in its own process group, with its output in a log file."""

    def __init__(
        self, args: list[str], log: Path, env: dict | None = None, prefix: Sequence[str] = ()
    ) -> None:
        """`prefix` runs it elsewhere, e.g. on a network-namespace host (`ip netns exec NS`)."""
        self.log = log
        self.fh = open(log, "wb")
        full_env = {**os.environ, **(env or {})}
        self.p = subprocess.Popen(
            [*prefix, sys.executable, "-m", "dynvllm", *args],
            stdout=self.fh,
            stderr=subprocess.STDOUT,
            env=full_env,
            preexec_fn=child_preexec,
        )
        self.ps = psutil.Process(self.p.pid)
        self._terminated = False

    def descendants(self) -> list[psutil.Process]:
        try:
            return self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def tail(self, n: int = 4000) -> str:
        self.fh.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def signal(self, sig: int) -> None:
        self.p.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM unless this already sent it (`stop_all` signals several, then waits on each)."""
        if self.p.poll() is None and not self._terminated:
            self.p.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait; on timeout SIGKILL the whole group so a failing test leaks nothing."""
        self.terminate()
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill_all()
        finally:
            self.fh.close()

    def kill_all(self) -> int:
        procs = [self.ps, *self.descendants()]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        return self.p.wait()


def stop_all(procs: Sequence[Proc], timeout: float = 60) -> None:
    """Stop several at once: SIGTERM to all, then wait for each (each drains on its own)."""
    for p in procs:
        p.terminate()
    for p in procs:
        p.stop(timeout)  # each has its SIGTERM already: this waits, or kills


def wait_http(url: str, predicate, proc: Proc, timeout: float = 240, interval: float = 0.5) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            raise AssertionError(f"process exited with {proc.p.returncode}:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                last = json.load(r)
                if predicate(last):
                    return last
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {url} (last: {last}):\n{proc.tail()}")


def wait_gone(pids: list[int], timeout: float = 30) -> list[int]:
    """PIDs still alive after `timeout` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [
            pid
            for pid in alive
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]
        time.sleep(0.2)
    return alive


SIM = ("--engine", "sim")  # engine_args of start_agg for simulated workers


def start_agg(
    model: Path,
    log: Path,
    namespace: str,
    *extra: str,
    workers: int = 1,
    env: dict | None = None,
    engine_args: Sequence[str] = ENGINE_ARGS,
    role: str = "agg",
):
    """`dynvllm serve agg` (or another standalone `role`) on the tiny model under the served name
    "tiny": (base URL, Proc). `engine_args`: the real engine's test arguments by default, `SIM`
    for the sim engine."""
    port = free_port()
    args = [
        "serve",
        role,
        "--model",
        str(model),
        "--served-model-name",
        "tiny",
        "--workers",
        str(workers),
        "--http-host",
        "127.0.0.1",
        "--http-port",
        str(port),
        "--namespace",
        namespace,
        *engine_args,
        *extra,
    ]
    return f"http://127.0.0.1:{port}", Proc(args, log, env=env)


#: Requests for vLLM's offline output of the plain tiny model, by the module that wants them.
#: Modules add theirs when imported (collection imports them all first); the `references`
#: fixture computes them all in one engine, which starts once instead of once per module.
PLAIN_REFERENCES: dict[str, list[dict]] = {}


def want_reference(name: str, requests: list[dict]) -> str:
    PLAIN_REFERENCES[name] = requests
    return name


def offline_reference(model: Path, requests: list[dict], llm_kwargs: dict | None = None) -> list:
    """vLLM's own offline outputs for `requests` (see tests/offline_reference.py), in a child."""
    script = Path(__file__).resolve().parent / "offline_reference.py"
    argv = [sys.executable, str(script), str(model), json.dumps(requests)]
    if llm_kwargs:
        argv.append(json.dumps(llm_kwargs))
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("REFERENCE ")]
    assert line, res.stderr[-3000:]
    return json.loads(line[0][len("REFERENCE ") :])


async def worker_stats(row: dict) -> dict:
    """A worker's stats endpoint (in-flight calls, KV-connector counters, ...), for a row of
    `dynvllm status` (its id and address)."""
    from dynvllm.runtime.streams import Connection, unary

    host, port = row["address"].split(":")
    conn = Connection(host, int(port), row["id"])
    await conn.open()
    try:
        return await unary(conn, "stats", None)
    finally:
        await conn.close()


def decode_transfers(nats_url: str, namespace: str) -> dict:
    """The first decode worker's KV-connector counters (NIXL's: bytes_transferred, ...):
    key -> [count, sum]."""
    from dynvllm.cli.status import collect
    from dynvllm.runtime import nats as natsrt
    from dynvllm.settings import build_settings

    async def main() -> dict:
        s = build_settings({"runtime": {"nats_url": nats_url, "namespace": namespace}})
        row = next(r for r in await collect(s, wait=0.5) if r["role"] == "decode")
        return (await worker_stats(row))["kv_transfer"]

    return natsrt.run(main())
