"""Operator commands against `serve agg --workers 2` on real vLLM, with an admin token. LoRA:
CLI load/list/unload, adapters as models, routing to holders only, equality with vLLM offline,
locks, limits and errors, an unload during a stream, on-demand loading. Engine operations:
clear-KV (CLI and HTTP) and sleep/wake."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import offline_reference, start_agg, start_service, stop_in_background, wait_http

TOKEN = "admin-secret"
PROMPTS = ["the cat sees a dog", "blue river and old city"]
LORA_ARGS = ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"]


@pytest.fixture(scope="module")
def roots(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name in ("a1", "a2", "a3"):
        shutil.copytree(tiny_model / "lora", root / name)
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(tiny_model / "lora", outside / "x")
    (root / "escape").symlink_to(outside / "x")
    return root, outside


@pytest.fixture(scope="module")
def service(tiny_model, roots, tmp_path_factory):
    root, _ = roots
    env = {"DYN_ADMIN_TOKEN": TOKEN, "DYN_LORA_ROOTS": str(root), "DYN_NAMESPACE": "lora"}
    log = tmp_path_factory.mktemp("lora") / "serve.log"
    url, proc = start_agg(tiny_model, log, "lora", *LORA_ARGS, workers=2, env=env)
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 2, proc)
        yield url, env
    finally:
        stop_in_background([proc])


def cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dynvllm", "lora", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


def workers(env: dict) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "dynvllm", "status", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    return sorted(i["id"] for i in json.loads(out.stdout)["instances"] if i["component"] == "worker")


@pytest.fixture(scope="module")
def reference(tiny_model, roots):
    root, _ = roots
    reqs = [
        {"kind": "completion", "input": p, "params": {"max_tokens": 16, "temperature": 0}} for p in PROMPTS
    ]
    reqs += [
        {
            "kind": "completion",
            "input": p,
            "params": {"max_tokens": 16, "temperature": 0},
            "lora": str(root / "a1"),
        }
        for p in PROMPTS
    ]
    return offline_reference(tiny_model, reqs, {"enable_lora": True, "max_loras": 1, "max_lora_rank": 8})


def _wait_models(url: str, want: set[str], timeout: float = 10) -> set[str]:
    deadline = time.monotonic() + timeout
    while True:
        ids = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        if want <= ids or time.monotonic() > deadline:
            return ids
        time.sleep(0.2)


def test_load_on_one_worker_routes_only_there_and_equals_offline(service, roots, reference):
    url, env = service
    root, _ = roots
    w1, _w2 = workers(env)
    r = cli(env, "load", "a1", "--source", str(root / "a1"), "--worker", w1)
    assert r.returncode == 0, r.stderr
    assert f"{w1}: loaded a1" in r.stdout
    listed = json.loads(cli(env, "list", "--json").stdout)
    assert [(x["name"], x["worker"]) for x in listed] == [("a1", w1)]
    models = (
        {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        if _wait_models(url, {"a1"})
        else {}
    )
    assert models["a1"]["parent"] == "tiny" and models["tiny"]["parent"] is None
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    for i, p in enumerate(PROMPTS * 3):
        i %= len(PROMPTS)
        raw = client.completions.with_raw_response.create(model="a1", prompt=p, max_tokens=16, temperature=0)
        assert raw.headers["x-dynvllm-worker"] == w1
        text = raw.parse().choices[0].text
        assert text == reference[2 + i][0] != reference[i][0]
        base = client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0)
        assert base.choices[0].text == reference[i][0]


def test_concurrent_loads_of_one_name_load_once(service, roots):
    _url, env = service
    root, _ = roots
    _, w2 = workers(env)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dynvllm",
                "lora",
                "load",
                "a2",
                "--source",
                str(root / "a2"),
                "--worker",
                w2,
                "--json",
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        for _ in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=300)[0])[0]["result"]["status"] for p in procs]
    assert sorted(outs) == ["already loaded", "loaded"]


def test_errors_are_clear(service, roots):
    url, env = service
    root, outside = roots
    w1, w2 = workers(env)
    cases = [
        (["load", "bad", "--source", str(root / "missing"), "--worker", w1], "no adapter_config.json"),
        (
            ["load", "bad", "--source", str(root / ".." / outside.name / "x"), "--worker", w1],
            "outside the allowed roots",
        ),
        (["load", "bad", "--source", str(root / "escape"), "--worker", w1], "outside the allowed roots"),
        (["load", "bad", "--source", "ftp://host/x", "--worker", w1], "unsupported adapter source scheme"),
    ]
    for args, needle in cases:
        r = cli(env, *args)
        assert r.returncode == 1 and needle in r.stderr, (args, r.stderr)
    r = cli({**env, "DYN_ADMIN_TOKEN": "wrong"}, "load", "a3", "--source", str(root / "a3"), "--worker", w1)
    assert r.returncode == 1 and "admin token" in r.stderr
    # w2 holds a2; a3 fits (max_loras 2), a further one does not.
    assert cli(env, "load", "a3", "--source", str(root / "a3"), "--worker", w2).returncode == 0
    r = cli(env, "load", "a1", "--source", str(root / "a1"), "--worker", w2)
    assert r.returncode == 1 and "max_loras" in r.stderr
    r = cli(env, "unload", "nothing-here")
    assert r.returncode == 2 and "no worker holds adapter 'nothing-here'" in r.stderr
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nothing-here", prompt="x", max_tokens=2)


def test_http_admin_routes_need_the_token(service, roots):
    url, _env = service
    root, _ = roots
    body = {"lora_name": "a3", "lora_path": str(root / "a3")}
    assert httpx.post(url + "/v1/load_lora_adapter", json=body).status_code == 401
    r = httpx.post(
        url + "/v1/unload_lora_adapter",
        json={"lora_name": "a3"},
        headers={"X-Admin-Token": TOKEN},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while "a3" in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = httpx.post(
        url + "/v1/unload_lora_adapter", json={"lora_name": "a3"}, headers={"X-Admin-Token": TOKEN}
    )
    assert r.status_code == 404


def test_unload_during_a_stream_lets_it_finish(service):
    url, env = service
    tokens = 1500  # the stream outlasts the CLI's start-up and its unload call by seconds

    async def run() -> tuple[str | None, int, float, float]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = await client.completions.create(
            model="a1",
            prompt=PROMPTS[0],
            max_tokens=tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks, finish, usage = 0, None, 0
        unloading = None

        def unload() -> float:
            done = cli(env, "unload", "a1")
            assert done.returncode == 0, done.stderr
            return time.monotonic()

        async for chunk in stream:
            chunks += 1
            if chunks == 3:
                unloading = asyncio.create_task(asyncio.to_thread(unload))
            for c in chunk.choices:
                finish = c.finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        ended = time.monotonic()
        assert unloading is not None
        return finish, usage, ended, await unloading

    finish, usage, ended, unloaded = asyncio.run(run())
    assert (finish, usage) == ("length", tokens)
    assert unloaded >= ended - 0.5, "the unload returned while a request still used the adapter"
    deadline = time.monotonic() + 10
    while "a1" in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_on_demand_loads_a_known_adapter_evicting_the_least_recently_used(service, roots, reference):
    _, env = service
    root, _ = roots
    w1, w2 = workers(env)
    for name in {x["name"] for x in json.loads(cli(env, "list", "--json").stdout)}:
        assert cli(env, "unload", name).returncode == 0
    # a1 becomes known (loaded once) but held by none; a2 and a3 fill both workers (max_loras 2).
    assert cli(env, "load", "a1", "--source", str(root / "a1"), "--worker", w1).returncode == 0
    assert cli(env, "unload", "a1").returncode == 0
    for w in (w1, w2):
        for name in ("a2", "a3"):
            r = cli(env, "load", name, "--source", str(root / name), "--worker", w)
            assert r.returncode == 0, r.stderr
    fe = start_service(["frontend"], Path(root) / "fe.log", "--lora-on-demand", env=env)
    try:
        fe_url = fe.url
        assert fe_url
        wait_http(fe_url + "/health", lambda b: b.get("workers") == 2, fe)
        client = openai.OpenAI(base_url=fe_url + "/v1", api_key="none", max_retries=0)
        # a2 used recently on both workers, a3 on neither: whichever worker the load picks for
        # a1 (a request's end may count there a few ms later), a3 is its least recently used.
        served: set[str] = set()
        with ThreadPoolExecutor(4) as pool:
            for attempt in range(20):
                raws = pool.map(
                    lambda i: client.completions.with_raw_response.create(
                        model="a2", prompt=f"x {i}", max_tokens=8
                    ),
                    range(4 * attempt, 4 * attempt + 4),
                )
                served |= {raw.headers["x-dynvllm-worker"] for raw in raws}
                if served == {w1, w2}:
                    break
        assert served == {w1, w2}
        r = client.completions.with_raw_response.create(
            model="a1", prompt=PROMPTS[0], max_tokens=16, temperature=0
        )
        assert r.parse().choices[0].text == reference[2][0]
        holder = r.headers["x-dynvllm-worker"]
        held = {x["name"] for x in json.loads(cli(env, "list", "--json").stdout) if x["worker"] == holder}
        assert held == {"a1", "a2"}  # a3, the least recently used there, made room
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="never-loaded", prompt="x", max_tokens=2)
    finally:
        fe.stop()


def test_clear_kv_and_sleep_wake(service):
    url, env = service
    w1, w2 = workers(env)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    prompt = " ".join(["the old river runs where the city road meets the blue mountain"] * 8)

    def ask(p: str):
        raw = client.completions.with_raw_response.create(model="tiny", prompt=p, max_tokens=2, temperature=0)
        return raw.parse().usage.prompt_tokens_details.cached_tokens, raw.headers

    ask(prompt)
    cached, headers = ask(prompt)
    assert cached >= 64 and int(headers["x-dynvllm-predicted-cached-tokens"]) >= 64
    r = subprocess.run(
        [sys.executable, "-m", "dynvllm", "kv", "clear", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(x["worker"] for x in json.loads(r.stdout)) == [w1, w2]
    assert httpx.post(url + "/clear_kv_blocks").status_code == 401  # admin token required
    body = httpx.post(url + "/clear_kv_blocks", headers={"X-Admin-Token": TOKEN}, timeout=60).json()
    assert body == {"cleared": [w1, w2], "failed": {}}
    cached, headers = ask(prompt)
    assert cached == 0 and headers["x-dynvllm-predicted-cached-tokens"] == "0"

    def op(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dynvllm", "worker", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=120,
        )

    assert op("sleep", w1).returncode == 0
    time.sleep(0.5)  # the card saying so reaches the frontend with the next announce
    assert {ask(f"sleepy prompt {i}")[1]["x-dynvllm-worker"] for i in range(6)} == {w2}
    # Both asleep: a streamed request fails before its first event, so it gets its real status and
    # a JSON error (not a 200 with an error event), as the same request unstreamed would.
    assert op("sleep", w2).returncode == 0
    time.sleep(0.5)
    for stream in (True, False):
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": stream}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 503, r.text
        assert "no live worker" in r.json()["error"]["message"]
    assert op("wake", w2).returncode == 0
    assert op("wake", w1).returncode == 0
    time.sleep(0.5)
    assert w1 in {ask(f"awake prompt number {i}")[1]["x-dynvllm-worker"] for i in range(8)}
    bad = op("sleep", "no-such-worker")
    assert bad.returncode == 2 and "no worker 'no-such-worker'" in bad.stderr
