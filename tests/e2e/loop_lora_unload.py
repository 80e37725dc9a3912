"""Temporary: the unload-during-a-stream case repeated on one service (1 and 3 streams)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import openai
import pytest

from tests.e2e.test_lora import (  # noqa: F401
    PROMPTS,
    cli,
    roots,
    service,
    test_unload_during_a_stream_lets_it_finish,
    workers,
)

REPS = int(os.environ.get("LOOP_REPS", "20"))


def _prepare(url, env, root):
    for name in {x["name"] for x in json.loads(cli(env, "list", "--json").stdout)}:
        cli(env, "unload", name)
    w1, _ = workers(env)
    r = cli(env, "load", "a1", "--source", str(root / "a1"), "--worker", w1)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 10
    while "a1" not in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}:
        assert time.monotonic() < deadline
        time.sleep(0.2)


@pytest.mark.parametrize("rep", range(REPS))
def test_one(service, roots, rep):
    url, env = service
    _prepare(url, env, roots[0])
    print(f"LOOP one rep={rep} t={time.time():.3f}", flush=True)
    test_unload_during_a_stream_lets_it_finish(service)


@pytest.mark.parametrize("rep", range(REPS))
def test_three(service, roots, rep):
    url, env = service
    _prepare(url, env, roots[0])
    print(f"LOOP three rep={rep} t={time.time():.3f}", flush=True)
    tokens = 1500

    async def one(client, i):
        stream = await client.completions.create(
            model="a1",
            prompt=PROMPTS[i % 2] + f" {i}",
            max_tokens=tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks, finish, usage = 0, None, 0
        async for chunk in stream:
            chunks += 1
            if chunks == 3:
                started.set()
            for c in chunk.choices:
                finish = c.finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return finish, usage, time.monotonic()

    async def run():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        tasks = [asyncio.create_task(one(client, i)) for i in range(3)]
        await started.wait()

        def unload():
            done = cli(env, "unload", "a1")
            assert done.returncode == 0, done.stderr
            return time.monotonic()

        unloading = asyncio.create_task(asyncio.to_thread(unload))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, await unloading

    started = asyncio.Event()
    results, unloaded = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    assert [(f, u) for f, u, _ in results] == [("length", tokens)] * 3
    assert unloaded >= max(t for *_, t in results) - 0.5


def _freeze(seconds: float) -> None:
    """Every process of the service stops for `seconds` (a host that stalls), then goes on."""
    import signal

    import psutil

    procs = [p for p in psutil.Process().children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGSTOP)
        except psutil.NoSuchProcess:
            pass
    try:
        time.sleep(seconds)
    finally:
        for p in procs:
            try:
                p.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass


@pytest.mark.parametrize("rep", range(REPS))
def test_stall(service, roots, rep):
    url, env = service
    _prepare(url, env, roots[0])
    print(f"LOOP stall rep={rep} t={time.time():.3f}", flush=True)
    tokens = 1500

    async def run():
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
        unloading = freezing = None

        def unload():
            done = cli(env, "unload", "a1")
            assert done.returncode == 0, done.stderr
            return time.monotonic()

        def freeze():
            time.sleep(float(os.environ.get("LOOP_FREEZE_AFTER", "4")))
            print(f"FREEZE t={time.time():.3f}", flush=True)
            _freeze(float(os.environ.get("LOOP_FREEZE", "2.6")))

        async for chunk in stream:
            chunks += 1
            if chunks == 3:
                unloading = asyncio.create_task(asyncio.to_thread(unload))
                freezing = asyncio.create_task(asyncio.to_thread(freeze))
            for c in chunk.choices:
                finish = c.finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        ended = time.monotonic()
        await freezing
        return finish, usage, ended, await unloading

    finish, usage, ended, unloaded = asyncio.run(run())
    assert (finish, usage) == ("length", tokens)
    assert unloaded >= ended - 0.5, "the unload returned while a request still used the adapter"


def _holder_pid(env) -> int:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "dynvllm", "status", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    listed = json.loads(cli(env, "list", "--json").stdout)
    holder = [x["worker"] for x in listed if x["name"] == "a1"][0]
    return [i["pid"] for i in json.loads(out.stdout)["instances"] if i["id"] == holder][0]


@pytest.mark.parametrize("rep", range(REPS))
def test_worker_stall(service, roots, rep):
    """The holder's worker process alone stops for LOOP_FREEZE seconds mid-stream."""
    import signal

    url, env = service
    _prepare(url, env, roots[0])
    pid = _holder_pid(env)
    print(f"LOOP worker_stall rep={rep} pid={pid} t={time.time():.3f}", flush=True)
    tokens = 1500

    async def run():
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
        unloading = freezing = None

        def unload():
            done = cli(env, "unload", "a1")
            assert done.returncode == 0, done.stderr
            return time.monotonic()

        def freeze():
            time.sleep(float(os.environ.get("LOOP_FREEZE_AFTER", "4")))
            print(f"FREEZE worker t={time.time():.3f}", flush=True)
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(float(os.environ.get("LOOP_FREEZE", "2.6")))
            finally:
                os.kill(pid, signal.SIGCONT)

        async for chunk in stream:
            chunks += 1
            if chunks == 3:
                unloading = asyncio.create_task(asyncio.to_thread(unload))
                freezing = asyncio.create_task(asyncio.to_thread(freeze))
            for c in chunk.choices:
                finish = c.finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        ended = time.monotonic()
        await freezing
        return finish, usage, ended, await unloading

    finish, usage, ended, unloaded = asyncio.run(run())
    assert (finish, usage) == ("length", tokens)
    assert unloaded >= ended - 0.5, "the unload returned while a request still used the adapter"
