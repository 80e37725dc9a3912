"""What an operator sees of a running service (sim engine: the claims are about dynvllm's own
processes): one trace per request across the frontend and a worker, JSON logs carrying request
ids from both, fixed worker metrics ports, the end-to-end latency histogram, a Grafana
dashboard whose every query names a metric the service exports, and the CLI telling two services
on one host apart."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dynvllm.runtime import state
from tests.helpers import SIM, Proc, free_port, start_agg, stop_in_background, wait_workers
from tests.otlp_receiver import OtlpReceiver

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dynvllm.json"
KEY = "sk-acme-1"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def two_free_ports() -> int:
    """A port whose next one is free too (the two workers' fixed metrics ports)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory, receiver):
    folder = tmp_path_factory.mktemp("observability")
    tenants = folder / "tenants.yaml"
    tenants.write_text(f"tenants:\n  acme:\n    keys: [{KEY}]\n    requests_per_second: 1000\n")
    metrics_port = two_free_ports()
    _, proc = start_agg(
        tiny_model,
        folder / "service.log",
        "obs",
        "--metrics-port",
        str(metrics_port),
        "--otlp-traces-endpoint",
        receiver.url,
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "--tenants-file",
        str(tenants),
        workers=2,
        engine_args=SIM,
        # The receiver speaks OTLP/HTTP; spans leave within 0.1 s instead of 5 s.
        env={"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    wait_workers(proc, 2)
    yield proc, metrics_port
    stop_in_background([proc])


def chat(proc: Proc, headers: dict | None = None) -> httpx.Response:
    assert proc.url
    return httpx.post(
        proc.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
        headers={"authorization": f"Bearer {KEY}", **(headers or {})},
        timeout=60,
    )


def test_one_trace_runs_from_the_client_through_the_frontend_to_the_worker(service, receiver):
    proc, _ = service
    r = chat(proc, {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"})
    assert r.status_code == 200, r.text
    spans = receiver.trace(TRACE_ID, 4)
    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == ["admission", "dynvllm.request", "route", "worker generate"], spans
    root = by_name["dynvllm.request"]
    assert root.parent_id == CLIENT_SPAN  # the client's span is the root's parent
    assert root.attributes["dynvllm.request_id"] == r.json()["id"].removeprefix("chatcmpl-")
    assert root.attributes["http.status_code"] == 200
    assert root.events == ("first token", "stream end")
    for name in ("admission", "route"):
        assert by_name[name].parent_id == root.span_id, name
    # The worker continues the frontend's request span, in another process.
    worker = by_name["worker generate"]
    assert worker.parent_id == root.span_id and worker.events == ("first token",)
    assert root.service == "dynvllm-frontend" and worker.service == "dynvllm-worker-agg"
    assert worker.pid != root.pid and worker.pid > 0 and root.pid > 0
    assert by_name["route"].attributes["dynvllm.worker"] == r.headers["x-dynvllm-worker"]
    # Without a traceparent a request starts a trace of its own.
    assert chat(proc).status_code == 200


def test_json_logs_carry_the_request_id_in_frontend_and_worker(service):
    proc, _ = service
    r = chat(proc)
    assert r.status_code == 200
    rid = r.json()["id"].removeprefix("chatcmpl-")
    mine: list[dict] = []
    for _ in range(50):
        lines = [json.loads(line) for line in proc.tail(1 << 20).splitlines() if line.startswith("{")]
        mine = [line for line in lines if line.get("request_id") == rid]
        if {line["process"] for line in mine} >= {"frontend", "worker agg"}:
            break
        time.sleep(0.1)
    assert {line["process"] for line in mine} == {"frontend", "worker agg"}, mine
    worker = next(line for line in mine if line["process"] == "worker agg")
    assert worker["level"] == "debug" and worker["logger"] == "dynvllm.worker"
    assert worker["message"].startswith("generate call of ")
    # Start-up lines of every process are JSON too.
    assert any(line["message"].startswith("worker ") and "serving tiny" in line["message"] for line in lines)


def test_workers_scrape_on_fixed_ports_and_the_frontend_times_whole_requests(service):
    proc, port = service
    for p in (port, port + 1):
        text = httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text
        assert 'dynvllm_worker_running_requests{model="tiny",role="agg"}' in text, p
    assert proc.url
    before = _count(httpx.get(proc.url + "/metrics").text, "200")
    for _ in range(3):
        assert chat(proc).status_code == 200
    unauthorized = httpx.post(proc.url + "/v1/chat/completions", json={"model": "tiny"})
    assert unauthorized.status_code == 401
    text = httpx.get(proc.url + "/metrics").text
    assert _count(text, "200") == before + 3


def _count(metrics: str, status: str) -> float:
    m = re.search(
        rf'^dynvllm_request_duration_seconds_count{{model="tiny",status="{status}"}} (\S+)$', metrics, re.M
    )
    return float(m.group(1)) if m else 0.0


def exported(text: str) -> set[str]:
    """Names a PromQL query may use for what a /metrics page exports (declared families too,
    before their first sample)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            name = name.removesuffix("_total")  # prometheus_client names a counter's family so
            names |= {name + s for s in suffixes.get(kind, ("",))}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def vllm_metric_names() -> set[str]:
    """vLLM's engine metrics, read from its source (the sim engine exports none; importing vLLM
    would take seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    source = (Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py").read_text()
    names = set()
    for name in re.findall(r'name="(vllm:[a-z0-9_]+)"', source):
        names |= {name, name + "_total", name + "_bucket", name + "_sum", name + "_count"}
    return names


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w.startswith(("dynvllm_", "vllm:"))}


def test_every_dashboard_query_names_an_exported_metric(service):
    proc, port = service
    assert proc.url
    chat(proc)  # tenants' and requests' label sets exist
    live = exported(httpx.get(proc.url + "/metrics").text)
    live |= exported(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
    known = live | vllm_metric_names()
    queries = dashboard_queries()
    used = set().union(*(metric_names(q) for q in queries))
    assert len(queries) > 30 and len(used) > 30
    assert used - known == set()
    # Each part of the service has panels: frontend, router, workers, vLLM engine, tenants.
    for prefix in ("dynvllm_request", "dynvllm_routed", "dynvllm_worker_", "vllm:", "dynvllm_tenant_"):
        assert any(u.startswith(prefix) for u in used), prefix
    rows = [p["title"] for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] == "row"]
    assert rows == ["Frontend", "Router", "Workers", "vLLM engine", "Tenants"]


def test_the_vllm_names_read_from_source_are_real():
    """The source scan finds the engine metrics vLLM documents (a broken scan would pass anything
    named vllm:* ... only if it found them; it must find these)."""
    names = vllm_metric_names()
    for n in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:e2e_request_latency_seconds"):
        assert n in names
    assert "vllm:no_such_metric" not in names


def test_two_services_on_one_host_each_command_reaches_its_own(service, tiny_model, tmp_path):
    """A second `serve` on this host: each keeps its own record; a command not told which one
    lists them and asks; told, it reaches that service's workers and no other's."""
    from tests.cli.test_targets import cli

    _, other = start_agg(tiny_model, tmp_path / "other.log", "obs2", engine_args=SIM)
    try:
        wait_workers(other, 1)
        r = subprocess.run(
            [sys.executable, "-m", "dynvllm", "status", "--timeout", "3"], capture_output=True, text=True
        )
        assert (
            r.returncode == 2 and "services run on this machine: pass --nats-url or --namespace" in r.stderr
        )
        assert "namespace obs " in r.stderr and "namespace obs2 " in r.stderr
        pids = {}
        for ns in ("obs", "obs2"):
            r = cli("status", "--namespace", ns, "--json", "--timeout", "3")
            assert r.exit_code == 0, r.stderr
            pids[ns] = {
                row["pid"] for row in json.loads(r.stdout)["instances"] if row["component"] == "worker"
            }
        assert len(pids["obs"]) == 2 and len(pids["obs2"]) == 1
        mine = {p.pid for p in other.descendants()}
        assert pids["obs2"] <= mine and not pids["obs"] & mine
    finally:
        stop_in_background([other])  # SIGTERM now; the drain is waited for at the session's end
    deadline = time.monotonic() + 10
    while any(r.namespace == "obs2" for r in state.records(probe=False)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [r.namespace for r in state.records(probe=False) if r.namespace.startswith("obs")] == ["obs"]
