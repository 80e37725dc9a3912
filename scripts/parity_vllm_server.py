"""A held-out battery of OpenAI, Responses and Anthropic requests sent to vLLM's own server and to
`dynvllm serve agg` on the same model, through the real clients, greedy; prints a table of every
field that differs (after scripts/paritykit.py's normalization) and whether it is a documented,
deliberate difference.

    .venv/bin/python scripts/parity_vllm_server.py [--model DIR] [--vllm-url U --dynvllm-url U]

Without `--model` it builds the tiny model (`dynvllm model tiny`) in a temporary folder. Without
the URLs it starts `vllm serve` and `dynvllm serve agg` with the same engine arguments on free
ports and stops both at the end. Exit status 1 when a difference is not documented.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paritykit as pk
from benchkit import free_port, serve_agg, stop_all
from parity_battery import BATTERY, NAME, Case

VENV_BIN = Path(sys.executable).parent
ENGINE = [
    "--enforce-eager",
    "--kv-cache-memory-bytes",
    str(128 << 20),
    "--block-size",
    "32",
    "--max-model-len",
    "1024",
    "--structured-outputs-config",
    json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "hermes",
]

# ---------------------------------------------------------------- clients


def _split(fn: Callable, body: dict) -> dict:
    """`body` as keyword arguments of the SDK's `fn`: its own parameters by name, the rest
    (vLLM's extensions) through `extra_body`, as a user of the SDK sends them."""
    params = inspect.signature(fn).parameters
    known = {k: v for k, v in body.items() if k in params}
    extra = {k: v for k, v in body.items() if k not in params}
    return {**known, "extra_body": extra} if extra else known


def _dump(obj: Any) -> Any:
    return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj


def _error(exc: Exception) -> dict:
    response = getattr(exc, "response", None)
    if response is None:
        raise exc
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return {"error": pk.summarize_error(response.status_code, body), "_message": _message(body)}


def _message(body: Any) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    return str(err.get("message") if isinstance(err, dict) else body)[:200]


class Server:
    def __init__(self, url: str) -> None:
        import anthropic
        import openai

        self.url = url
        self.oa = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        self.an = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=120)

    def run(self, case: Case) -> Any:
        import anthropic
        import openai

        try:
            return getattr(self, "_" + case.kind)(dict(case.body), case)
        except (openai.APIStatusError, anthropic.APIStatusError) as exc:
            return _error(exc)

    def _chat(self, body: dict, _case: Case) -> Any:
        fn = self.oa.chat.completions.create
        return _dump(fn(**_split(fn, body)))

    def _chat_stream(self, body: dict, _case: Case) -> Any:
        fn = self.oa.chat.completions.create
        chunks = [_dump(c) for c in fn(**_split(fn, {**body, "stream": True}))]
        return pk.summarize_chat_stream(chunks)

    def _completion(self, body: dict, _case: Case) -> Any:
        fn = self.oa.completions.create
        return _dump(fn(**_split(fn, body)))

    def _completion_stream(self, body: dict, _case: Case) -> Any:
        fn = self.oa.completions.create
        chunks = [_dump(c) for c in fn(**_split(fn, {**body, "stream": True}))]
        return pk.summarize_chat_stream(chunks)

    def _responses(self, body: dict, _case: Case) -> Any:
        fn = self.oa.responses.create
        return _dump(fn(**_split(fn, body)))

    def _responses_stream(self, body: dict, _case: Case) -> Any:
        fn = self.oa.responses.create
        events = [_dump(e) for e in fn(**_split(fn, {**body, "stream": True}))]
        summary = pk.summarize_events(events, ("response.completed", "response.incomplete"))
        summary["text"] = "".join(
            e.get("delta", "") for e in events if e["type"] == "response.output_text.delta"
        )
        summary["sequence_numbers"] = [e.get("sequence_number") for e in events] == list(range(len(events)))
        return summary

    def _responses_store(self, body: dict, _case: Case) -> Any:
        fn = self.oa.responses.create
        created = fn(**_split(fn, body))
        return {"created": _dump(created), "retrieved": _dump(self.oa.responses.retrieve(created.id))}

    def _responses_previous(self, body: dict, _case: Case) -> Any:
        fn = self.oa.responses.create
        first = fn(**_split(fn, body))
        second = fn(**_split(fn, {**body, "input": "and then?", "previous_response_id": first.id}))
        return {"first": _dump(first), "second": _dump(second)}

    def _messages(self, body: dict, _case: Case) -> Any:
        fn = self.an.messages.create
        return _dump(fn(**_split(fn, body)))

    def _messages_stream(self, body: dict, _case: Case) -> Any:
        fn = self.an.messages.create
        events = [_dump(e) for e in fn(**_split(fn, {**body, "stream": True}))]
        summary = pk.summarize_events(events, ("message_delta",))
        summary["start"] = next((e["message"] for e in events if e["type"] == "message_start"), None)
        summary["text"] = "".join(
            (e.get("delta") or {}).get("text", "") for e in events if e["type"] == "content_block_delta"
        )
        return summary

    def _count_tokens(self, body: dict, _case: Case) -> Any:
        fn = self.an.messages.count_tokens
        return _dump(fn(**_split(fn, body)))

    def _http(self, body: dict, case: Case) -> Any:
        content = case.raw if case.raw is not None else json.dumps(body).encode()
        r = httpx.request(
            case.method,
            self.url + case.endpoint,
            content=content,
            headers={"content-type": "application/json"},
            timeout=120,
        )
        try:
            data = r.json()
        except ValueError:
            data = r.text
        if r.status_code < 400:
            return {"status": r.status_code, "body": data}
        return {"error": pk.summarize_error(r.status_code, data), "_message": _message(data)}


# ---------------------------------------------------------------- servers


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        start_new_session=True,
    )


def _wait(
    url: str, proc: subprocess.Popen, log: Path, ready: Callable[[dict], bool], timeout: float = 600
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{log} ended:\n{log.read_text()[-3000:]}")
        try:
            r = httpx.get(url + "/v1/models", timeout=5)
            if r.status_code == 200 and ready(r.json()):
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} not ready in {timeout} s; see {log}")


def start_servers(model: Path, work: Path) -> tuple[str, str, list[subprocess.Popen]]:
    env = {"HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    vport, dport = free_port(), free_port()
    vllm = _start(
        [
            str(VENV_BIN / "vllm"),
            "serve",
            str(model),
            "--served-model-name",
            NAME,
            "--port",
            str(vport),
            *ENGINE,
        ],
        work / "vllm.log",
        env,
    )
    dyn = _start(
        [
            *serve_agg(model, NAME),
            "--http-port",
            str(dport),
            "--namespace",
            f"parity{dport}",
            *ENGINE,
        ],
        work / "dynvllm.log",
        {**env, "DYN_STATE_DIR": str(work / "state")},
    )
    procs = [vllm, dyn]
    try:
        vurl, durl = f"http://127.0.0.1:{vport}", f"http://127.0.0.1:{dport}"
        _wait(vurl, vllm, work / "vllm.log", lambda b: bool(b.get("data")))
        _wait(durl, dyn, work / "dynvllm.log", lambda b: bool(b.get("data")))
    except BaseException:
        stop_all(procs)
        raise
    return vurl, durl, procs


# ---------------------------------------------------------------- table


Result = tuple[Case, Any, Any]  # a case, vLLM's answer, dynvllm's answer


def run_battery(vllm: Server, dyn: Server, cases: list[Case]) -> list[Result]:
    return [(case, vllm.run(case), dyn.run(case)) for case in cases]


def print_table(results: list[Result], full: bool = False) -> int:
    """The parity table: each differing field pattern once, with the requests it showed in (or,
    `full`, one row per request and field); returns how many rows are not documented."""
    rows: dict[tuple[str, str], list] = {}
    clean = identical = 0
    for case, a, b in results:
        grouped = pk.group(pk.compare(a, b))
        identical += not grouped
        statuses = [pk.verdict(case.name, row) for row in grouped]
        clean += "DIFFERENT" not in statuses
        for row, status in zip(grouped, statuses, strict=True):
            name = row.field if full else pk.unwrap(row.field)
            key = (case.name if full else case.endpoint, name)
            entry = rows.setdefault(key, [case.endpoint, name, row, status, []])
            entry[4].append(case.name)
            if status == "DIFFERENT":  # one undocumented case makes the row undocumented
                entry[3] = status
    print("| endpoint | field | vLLM | dynvllm | same? | requests |")
    print("|---|---|---|---|---|---|")
    for endpoint, name, row, status, cases in rows.values():
        print(
            f"| {endpoint} | {pk.short(name, 60)} | {pk.short(row.vllm)} | {pk.short(row.dynvllm)} "
            f"| {status} | {pk.short(', '.join(cases), 80)} |"
        )
    undocumented = sum(r[3] == "DIFFERENT" for r in rows.values())
    print(
        f"\n{len(results)} requests: {identical} identical in every field, {clean} equal but for "
        f"documented differences; {undocumented} undocumented rows"
    )
    same = [c.name for c, a, b in results if not pk.compare(a, b)]
    print("identical: " + ", ".join(same))
    for case, a, b in results:
        if isinstance(a, dict) and "_message" in a:
            print(f"  {case.name}: vLLM says {a['_message']!r}; dynvllm says {b.get('_message')!r}")
    return undocumented


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model folder (default: build the tiny model)")
    ap.add_argument("--vllm-url", help="an already running `vllm serve` (served name: tiny)")
    ap.add_argument("--dynvllm-url", help="an already running `dynvllm serve agg` (served name: tiny)")
    ap.add_argument("--only", default="", help="run the cases whose name starts with this")
    ap.add_argument("--dump", type=Path, help="write every answer (both servers) to this JSON file")
    ap.add_argument("--full", action="store_true", help="one row per request and field")
    args = ap.parse_args()
    cases = [c for c in BATTERY if c.name.startswith(args.only)]
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        work = Path(tmp)
        try:
            if args.vllm_url and args.dynvllm_url:
                vurl, durl = args.vllm_url, args.dynvllm_url
            else:
                model = args.model
                if model is None:
                    model = work / "tiny"
                    subprocess.run([sys.executable, "-m", "dynvllm", "model", "tiny", str(model)], check=True)
                t0 = time.monotonic()
                vurl, durl, procs = start_servers(model, work)
                print(f"both servers ready in {time.monotonic() - t0:.0f} s", file=sys.stderr)
            results = run_battery(Server(vurl), Server(durl), cases)
        finally:
            stop_all(procs)
    if args.dump:
        args.dump.write_text(json.dumps({c.name: {"vllm": a, "dynvllm": b} for c, a, b in results}, indent=1))
    sys.exit(1 if print_table(results, args.full) else 0)


if __name__ == "__main__":
    main()
