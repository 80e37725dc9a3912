"""The CLI never talks to a service it picked silently: each `serve` keeps its own record; with
several on the host a command lists them and asks; a record whose NATS is gone is stale. (Two
real `serve` processes on one host: tests/e2e/test_observability.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from dynvllm.runtime.nats import EmbeddedNats


def dynvllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dynvllm", *args], capture_output=True, text=True, timeout=60
    )


def cli(*args: str) -> Any:
    """The command run in this process (each one as a subprocess costs seconds of imports)."""
    from typer.testing import CliRunner

    from dynvllm.cli import app

    return CliRunner().invoke(app, list(args))


def recorder(namespace: str, url: str) -> subprocess.Popen:
    """A process that records a service as `serve` does (its own record, by its pid), then waits."""
    code = (
        "import sys, time\nfrom dynvllm.runtime import state\n"
        f"state.record({namespace!r}, nats_url={url!r}, http_port=1)\n"
        "print('ok', flush=True)\ntime.sleep(120)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "ok\n"
    return p


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DYN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("DYN_NATS_URL", raising=False)
    monkeypatch.delenv("DYN_NAMESPACE", raising=False)
    return tmp_path / "state"


def test_two_records_are_listed_and_neither_is_picked(state_dir, nats_url):
    other = EmbeddedNats()
    other_url = other.start()
    procs = [recorder("alpha", nats_url), recorder("beta", other_url)]
    try:
        assert len(list((state_dir / "services").glob("*.json"))) == 2  # none overwrote the other
        for cmd in (["status"], ["lora", "list"], ["kv", "clear"]):
            r = cli(*cmd, "--timeout", "2")
            assert r.exit_code == 2 and r.stdout == "", (cmd, r.stderr)
            assert "2 services run on this machine: pass --nats-url or --namespace to say which" in r.stderr
            assert f"namespace alpha  {nats_url}" in r.stderr and f"namespace beta  {other_url}" in r.stderr
        # Named, each command reaches its own service.
        r = cli("status", "--namespace", "beta", "--json", "--timeout", "2")
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout) == {"nats_url": other_url, "instances": []}
        r = cli("status", "--nats-url", nats_url, "--json", "--timeout", "2")
        assert r.exit_code == 0 and json.loads(r.stdout)["nats_url"] == nats_url
        r = cli("status", "--namespace", "gamma")
        assert r.exit_code == 2 and "no service in namespace 'gamma' runs on this machine" in r.stderr
        # beta's NATS goes: its record is stale, reported, and never chosen.
        other.stop()
        r = cli("services", "--json")
        rows = {row["namespace"]: row for row in json.loads(r.stdout)}
        assert rows["alpha"]["stale"] is None
        assert rows["beta"]["stale"] == f"nothing answers at {other_url}"
        assert "STALE: nothing answers at" in cli("services").stdout
        r = cli("status", "--namespace", "beta", "--timeout", "2")
        assert r.exit_code == 2 and "no service in namespace 'beta'" in r.stderr and "STALE" in r.stderr
        r = cli("status", "--json", "--timeout", "2")  # the one live service left
        assert r.exit_code == 0 and json.loads(r.stdout)["nats_url"] == nats_url
        # alpha's serve goes: its record is reported once, then removed.
        procs[0].kill()
        procs[0].wait()
        rows = json.loads(cli("services", "--json").stdout)
        assert [(r["namespace"], r["stale"]) for r in rows if r["namespace"] == "alpha"] == [
            ("alpha", f"its serve (pid {procs[0].pid}) is gone")
        ]
        assert [r["namespace"] for r in json.loads(cli("services", "--json").stdout)] == ["beta"]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        other.stop()
