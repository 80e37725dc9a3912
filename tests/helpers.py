"""Process helpers for end-to-end tests: start dynvllm commands, wait, and prove cleanup."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import psutil

from dynvllm.process import child_preexec  # own group, and SIGTERM if the test runner dies

ENGINE_ARGS = ["--enforce-eager", "--kv-cache-memory-bytes", str(128 << 20), "--block-size", "32"]
SIM = ("--engine", "sim")  # engine_args of start_service for simulated workers
# A random-weight model fills JSON with whitespace until max_tokens; vLLM's engine-wide option
# keeps structured JSON compact. The shared service's engine and the reference engine both run
# with it; it changes nothing for requests without structured outputs.
COMPACT = {"backend": "xgrammar", "disable_any_whitespace": True}


_GIVEN: set[int] = set()
# pytest-xdist's processes draw from disjoint residues of the range, so two of them never hand out
# the same port in the moment before either binds it.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
_WORKERS = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a port from that range may be taken as
    the local end of any outgoing connection in the seconds before the process given it binds.
    Never the same port twice in one test process: a server given several ports at once (a NATS
    pod's client, cluster and monitor ports) binds none of them until it starts."""
    top = max(10001, _EPHEMERAL_LOW - 1)
    for _ in range(500):
        port = random.randrange(10000, top)
        port += (_WORKER - port) % _WORKERS
        if port >= top or port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _GIVEN.add(port)
    return port


class NatsServer:
    """A nats-server with the options a test gives (`args`, a `config` file's text), on a free
    port, listening once made (`EmbeddedNats` is the service's own, with JetStream)."""

    def __init__(self, tmp_path: Path, *args: str, config: str = "") -> None:
        from dynvllm.runtime.nats import nats_server_binary

        self.port = free_port()
        cmd = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), *args]
        if config:
            path = tmp_path / f"nats-{self.port}.conf"
            path.write_text(config)
            cmd += ["-c", str(path)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"nats://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()


class Proc:
    """A dynvllm command in its own process group, with its output in a log file. `url` is its
    HTTP address when `start_service` gave it one."""

    def __init__(
        self,
        args: list[str],
        log: Path,
        env: dict | None = None,
        prefix: Sequence[str] = (),
        url: str | None = None,
    ) -> None:
        """`prefix` runs it elsewhere, e.g. on a network-namespace host (`ip netns exec NS`)."""
        self.log = log
        self.url = url
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


_stopping: list[threading.Thread] = []


def stop_in_background(procs: Sequence[Proc], timeout: float = 60) -> None:
    """SIGTERM now; wait (or kill) on a thread. A service takes ~10 s to shut its engines down,
    which the next module's start-up need not wait for when nothing is asserted about the stop.
    `wait_background_stops` (at the end of the session) joins them all."""
    for p in procs:
        p.terminate()
    t = threading.Thread(target=stop_all, args=(list(procs), timeout), daemon=True)
    t.start()
    _stopping.append(t)


def wait_background_stops() -> None:
    while _stopping:
        _stopping.pop().join()


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


def wait_workers(proc: Proc, count: int, timeout: float = 240) -> dict:
    """Wait until the frontend at `proc.url` counts `count` workers; its /health body."""
    assert proc.url, "a service started without an HTTP port"
    return wait_http(proc.url + "/health", lambda b: b.get("workers") == count, proc, timeout)


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


def start_service(
    command: Sequence[str],
    log: Path,
    *extra: str,
    model: Path | None = None,
    namespace: str | None = None,
    nats_url: str | None = None,
    workers: int | None = None,
    engine_args: Sequence[str] = ENGINE_ARGS,
    http: bool = True,
    http_host: str = "127.0.0.1",
    http_port: int | None = None,
    env: dict | None = None,
    prefix: Sequence[str] = (),
) -> Proc:
    """Start a dynvllm `command` (`["serve", "agg"]`, `["frontend"]`, ...) in the background.

    `model` serves that folder under the name "tiny", with `engine_args` (the real engine's test
    arguments by default, `SIM` for the sim engine); `http` gives it an HTTP server on a free
    port of `http_host` (or `http_port`), whose address becomes the Proc's `url`; a worker that
    joins a service (`--no-frontend`, prefill, decode) passes `http=False`."""
    args = [*command]
    if model is not None:
        args += ["--model", str(model), "--served-model-name", "tiny", *engine_args]
    if workers is not None:
        args += ["--workers", str(workers)]
    if namespace is not None:
        args += ["--namespace", namespace]
    if nats_url is not None:
        args += ["--nats-url", nats_url]
    url = None
    if http:
        port = http_port or free_port()
        args += ["--http-host", http_host, "--http-port", str(port)]
        url = f"http://{http_host}:{port}"
    return Proc([*args, *extra], log, env=env, prefix=prefix, url=url)


def start_agg(
    model: Path,
    log: Path,
    namespace: str,
    *extra: str,
    workers: int = 1,
    env: dict | None = None,
    engine_args: Sequence[str] = ENGINE_ARGS,
    role: str = "agg",
) -> tuple[str, Proc]:
    """`dynvllm serve agg` (or another standalone `role`) on the tiny model: (base URL, Proc)."""
    proc = start_service(
        ["serve", role],
        log,
        *extra,
        model=model,
        namespace=namespace,
        workers=workers,
        engine_args=engine_args,
        env=env,
    )
    assert proc.url
    return proc.url, proc


#: Requests for vLLM's offline output of the plain tiny model, by the module that wants them.
#: Modules add theirs when imported (collection imports them all first); the `references`
#: fixture computes them all in one engine, which starts once instead of once per module.
PLAIN_REFERENCES: dict[str, list[dict]] = {}
#: That engine's arguments: LoRA on (requests may name the tiny model's adapter, "lora": "lora")
#: and the shared service's structured-output setting. Neither changes the other requests'
#: outputs (checked token for token when these were merged).
REFERENCE_ENGINE = {
    "structured_outputs_config": COMPACT,
    "enable_lora": True,
    "max_loras": 1,
    "max_lora_rank": 8,
}


def want_reference(name: str, requests: list[dict]) -> str:
    PLAIN_REFERENCES[name] = requests
    return name


class OfflineReference:
    """vLLM's own offline outputs for `requests` (see tests/offline_reference.py, or another
    `script` that prints `REFERENCE <json>` such as tests/offline_pooling.py), computed in a child
    that starts at once, so its engine can start while a service's engines do."""

    def __init__(
        self,
        model: Path,
        requests: list,
        llm_kwargs: dict | None = None,
        script: str = "offline_reference.py",
    ) -> None:
        path = Path(__file__).resolve().parent / script
        argv = [sys.executable, str(path), str(model), json.dumps(requests)]
        if llm_kwargs:
            argv.append(json.dumps(llm_kwargs))
        # Files, not pipes: nobody reads the child's output until `result`, and a full pipe
        # would stall it.
        self.out, self.err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        # The engine core in the child itself: one process fewer to import torch and vLLM halves
        # the child's start-up (the outputs were checked to be the same token for token).
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        self.p = subprocess.Popen(argv, stdout=self.out, stderr=self.err, env=env, preexec_fn=child_preexec)
        self._result: list | None = None

    def result(self, timeout: float = 600) -> list:
        if self._result is None:
            try:
                self.p.wait(timeout)
            finally:
                self.close()
            stdout, stderr = (self._read(f) for f in (self.out, self.err))
            line = [ln for ln in stdout.splitlines() if ln.startswith("REFERENCE ")]
            assert line, stderr[-3000:]
            self._result = json.loads(line[0][len("REFERENCE ") :])
        return self._result

    @staticmethod
    def _read(f) -> str:
        f.seek(0)
        return f.read().decode(errors="replace")

    def close(self) -> None:
        """Kill the child's group if it still runs (a session that ends before reading it)."""
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except OSError:
                pass
            self.p.wait()


def offline_reference(model: Path, requests: list[dict], llm_kwargs: dict | None = None) -> list:
    """vLLM's own offline outputs for `requests`, computed now."""
    return OfflineReference(model, requests, llm_kwargs).result()


def all_worker_stats(nats_url: str, namespace: str) -> list[dict]:
    """Stats of every worker of a namespace, as `dynvllm status` finds them."""
    import asyncio

    from dynvllm.cli.status import collect, worker_stats
    from dynvllm.runtime import nats as natsrt
    from dynvllm.settings import build_settings

    async def main() -> list[dict]:
        s = build_settings({"runtime": {"nats_url": nats_url, "namespace": namespace}})
        rows = [r for r in await collect(s, wait=0.5) if r["component"] == "worker"]
        return list(await asyncio.gather(*(worker_stats(r) for r in rows)))

    return natsrt.run(main())


def decode_transfers(nats_url: str, namespace: str) -> dict:
    """The first decode worker's KV-connector counters (NIXL's: bytes_transferred, ...):
    key -> [count, sum]."""
    from dynvllm.cli.status import collect, worker_stats
    from dynvllm.runtime import nats as natsrt
    from dynvllm.settings import build_settings

    async def main() -> dict:
        s = build_settings({"runtime": {"nats_url": nats_url, "namespace": namespace}})
        row = next(r for r in await collect(s, wait=0.5) if r["role"] == "decode")
        return (await worker_stats(row))["kv_transfer"]

    return natsrt.run(main())


def kv_probe(nats_url: str, namespace: str, model: Path, before: dict | None = None) -> dict:
    """scripts/gpu/kv_probe.py's report of the KV moved since `before` (counters as the probe
    prints them; all since the workers started when None): role -> bytes, tokens, transfers, ..."""
    probe = Path(__file__).resolve().parents[1] / "scripts" / "gpu" / "kv_probe.py"
    with tempfile.NamedTemporaryFile("w", suffix=".json") as base:
        json.dump(before or {}, base)
        base.flush()
        out = subprocess.run(
            [sys.executable, str(probe), nats_url, namespace, str(model), base.name],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line[3:]) for line in out.stdout.splitlines() if line.startswith("KV ")]
    return {r["role"]: r for r in rows}


class LongStream:
    """A streamed 1,500-token greedy completion read in a thread from the moment it is made, for
    tests that stop a service under it: `started` is set at the first chunk, `done` at [DONE]."""

    def __init__(self, url: str, timeout: float) -> None:
        self.chunks: list[dict] = []
        self.started, self.done = threading.Event(), threading.Event()
        self.url, self.timeout = url, timeout
        self.thread = threading.Thread(target=self._consume)
        self.thread.start()

    def _consume(self) -> None:
        import httpx

        body = {
            "model": "tiny",
            "prompt": "the cat",
            "max_tokens": 1500,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=self.timeout) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    self.done.set()
                elif line.startswith("data: "):
                    self.chunks.append(json.loads(line[6:]))
                    self.started.set()

    def text(self) -> str:
        return "".join(c["choices"][0]["text"] for c in self.chunks)
