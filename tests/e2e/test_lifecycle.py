"""Worker and service lifecycles with real processes: drain on SIGTERM, no engine leftovers."""

from __future__ import annotations

import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from dynvllm.runtime import nats as natsrt
from dynvllm.runtime.discovery import Watcher
from dynvllm.settings import RuntimeSettings
from tests.helpers import LongStream, Proc, start_agg, start_service, wait_gone, wait_http


async def _wait_registered(url: str, namespace: str, present: bool, timeout: float) -> bool:
    nc = await natsrt.connect(RuntimeSettings(nats_url=url))
    w = Watcher(nc, namespace, lease_ttl=2.0)
    await w.start()
    try:
        return await w.wait_for(lambda w: bool(w.instances("worker")) == present, timeout)
    finally:
        await w.stop()
        await nc.close()


def _engine_pids(proc: Proc) -> list[int]:
    return [
        p.pid for p in proc.descendants() if "VLLM" in " ".join(p.cmdline()) or p.name().startswith("VLLM")
    ]


@pytest.fixture(scope="module")
def services(tiny_model, nats_url, tmp_path_factory):
    """Each test's own service, all started at once: their engines start side by side instead of
    one after another. Each test ends its own; whatever a failed test left is killed here."""
    logs = tmp_path_factory.mktemp("lc")
    # The SIGTERM test's temp folder (vLLM's IPC sockets, NATS's store), short enough for socket names.
    scratch = Path(tempfile.mkdtemp(prefix="lc-"))
    procs = {
        ns: start_service(
            ["serve", "agg", "--no-frontend"],
            logs / f"{ns}.log",
            model=tiny_model,
            namespace=ns,
            nats_url=nats_url,
            http=False,
        )
        for ns in ("lc-kill", "lc-engine")
    }
    procs["lc-term"] = start_agg(tiny_model, logs / "serve.log", "lc-term", env={"TMPDIR": str(scratch)})[1]
    try:
        yield procs, scratch
    finally:
        for proc in procs.values():
            proc.kill_all()
        shutil.rmtree(scratch, ignore_errors=True)


def _worker(services, nats_url: str, namespace: str) -> Proc:
    proc = services[0][namespace]
    assert natsrt.run(_wait_registered(nats_url, namespace, True, 240)), proc.tail()
    return proc


def test_sigkill_of_worker_leaves_no_engine_process(services, nats_url):
    proc = _worker(services, nats_url, "lc-kill")
    try:
        everything = [p.pid for p in proc.descendants()]
        assert _engine_pids(proc), [p.name() for p in proc.descendants()]
        # Spawned, as `vllm serve` starts them: a spawned process begins with the environment the
        # worker set for it (a forked one keeps the worker's initial block, without the variable).
        environs = [Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in _engine_pids(proc)]
        assert all(b"VLLM_WORKER_MULTIPROC_METHOD=spawn" in env for env in environs), environs
        proc.p.send_signal(signal.SIGKILL)
        proc.p.wait()
        assert wait_gone(everything, 20) == []
        assert natsrt.run(_wait_registered(nats_url, "lc-kill", False, 5))
    finally:
        proc.kill_all()


def test_engine_death_deregisters_and_exits_nonzero(services, nats_url):
    proc = _worker(services, nats_url, "lc-engine")
    try:
        everything = [p.pid for p in proc.descendants()]
        core = [
            p for p in proc.descendants() if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())
        ]
        assert core
        core[0].kill()
        assert proc.p.wait(60) != 0
        assert natsrt.run(_wait_registered(nats_url, "lc-engine", False, 5))
        assert wait_gone(everything, 20) == []
    finally:
        proc.kill_all()


def test_sigterm_during_stream_finishes_stream_then_nothing_remains(services):
    procs, scratch = services
    proc = procs["lc-term"]
    url = proc.url
    assert url
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 1, proc)
        everything = [proc.p.pid] + [p.pid for p in proc.descendants()]
        stream = LongStream(url, timeout=120)
        assert stream.started.wait(60)
        proc.p.send_signal(signal.SIGTERM)
        stream.thread.join(120)
        assert stream.done.is_set(), proc.tail()
        assert "choices" in stream.chunks[-1], stream.chunks[-1]
        assert stream.chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len(stream.text()) > 1000
        assert proc.p.wait(120) == 0
        assert wait_gone(everything, 20) == []
        assert sorted(p.name for p in scratch.iterdir()) == []
    finally:
        proc.kill_all()
        shutil.rmtree(scratch, ignore_errors=True)
