"""What the side-by-side benchmark scripts share: the tiny model and a sim-engine `serve agg`
command line, a free port, waiting for a server they started, and stopping it with everything it
started (engine processes included)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path


def sim_load_options(ap: argparse.ArgumentParser, rounds: int) -> None:
    """The options of a closed-loop load on sim-engine services, as every such script reads them."""
    ap.add_argument("--model", help="a model folder (tokenizer and config); default: a tiny one built here")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-connections", action="store_true")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--decode-ms", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--together", action="store_true", help="load the services at once in each round")


def model_or_tiny(model: str | None, folder: Path) -> str:
    """`model`, or a tiny one built in `folder` (the sim engine needs only its tokenizer)."""
    if model is not None:
        return model
    tiny = str(folder / "tiny")
    subprocess.run([sys.executable, "-m", "dynvllm", "model", "tiny", tiny], check=True, capture_output=True)
    return tiny


def serve_agg(model: str | Path, name: str = "m") -> list[str]:
    """The start of a `dynvllm serve agg` command line serving `model` as `name`."""
    return [
        sys.executable,
        *("-m", "dynvllm", "serve", "agg", "--model", str(model), "--served-model-name", name),
    ]


def sim_serve(args: argparse.Namespace, model: str, port: int, namespace: str) -> list[str]:
    """`serve agg` on the sim engine as `sim_load_options` describe it, served as "m"."""
    return [
        *serve_agg(model),
        *("--engine", "sim", "--workers", str(args.workers), "--sim-decode-ms-per-step", str(args.decode_ms)),
        *("--namespace", namespace, "--http-host", "127.0.0.1", "--http-port", str(port)),
    ]


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


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every process group at once (they drain side by side), then SIGKILL to any
    group still there after 60 s."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


#: An OTLP/HTTP receiver that reads each batch and answers 200 (what a collector costs aside).
_OTLP_RECEIVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def otlp_receiver() -> tuple[str, subprocess.Popen]:
    """A local OTLP/HTTP receiver process: its traces endpoint and the process (kill it at the end)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _OTLP_RECEIVER, str(port)], start_new_session=True)
    return f"http://127.0.0.1:{port}/v1/traces", proc


def traced(cmd: list[str], env: dict[str, str], endpoint: str, sample: float | None) -> None:
    """Turns tracing on in a `serve` command line and its environment: OTLP/HTTP to `endpoint`;
    with `sample`, a parent-based ratio sampler (else every request a client marks sampled)."""
    cmd += ["--otlp-traces-endpoint", endpoint]
    env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    if sample is not None:
        env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        env["OTEL_TRACES_SAMPLER_ARG"] = str(sample)


def traceparent() -> str:
    """A sampled W3C traceparent of a new trace (the client asks for the request to be traced)."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def cpu_by_process(proc: subprocess.Popen) -> dict[int, tuple[list[str], float]]:
    """CPU seconds (user + system) used so far by a started process and each of its live children,
    by pid, with the process's command line. Raises psutil's error when the process itself is gone;
    a child that ends meanwhile is left out."""
    import psutil

    out: dict[int, tuple[list[str], float]] = {}
    root = psutil.Process(proc.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            args = p.cmdline()
        except psutil.Error:
            continue
        out[p.pid] = (args, t.user + t.system)
    return out


def cpu_seconds(proc: subprocess.Popen, kind: Callable[[list[str]], str] | None = None) -> dict[str, float]:
    """CPU seconds used so far by a service's processes, by kind: `kind` of a process's command
    line, else serve (the process itself), frontend, worker, other (NATS)."""
    out: dict[str, float] = {}
    for pid, (args, seconds) in cpu_by_process(proc).items():
        if kind is not None:
            name = kind(args)
        elif pid == proc.pid:
            name = "serve"
        else:
            name = next((a for a in ("frontend", "worker") if a in args), "other")
        out[name] = out.get(name, 0.0) + seconds
    return out
