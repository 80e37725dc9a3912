"""The launch scripts (scripts/launch/*.sh): each starts its topology from separate role processes
on the tiny model, serves a request with vLLM's own greedy output, and leaves nothing on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from dynvllm.process import child_preexec
from tests.helpers import ENGINE_ARGS, free_port, kv_probe, wait_gone, want_reference

pytestmark = pytest.mark.vllm

LAUNCH = Path(__file__).resolve().parents[2] / "scripts" / "launch"
# Over the 40-token threshold below, so disaggregated topologies take the prefill hop.
PROMPT = (
    "the cat sees a dog and the bird finds a tree near the old river where the city road runs and "
    "the model cache keeps nine blocks of the prefix while seven old birds eat by the happy mountain"
)
DISAGG = {"FRONTEND_ARGS": "--disagg-min-prompt-tokens 40"}
# script -> (environment, processes that register as workers)
TOPOLOGIES = {
    # The router scripts exec agg.sh and disagg.sh with their defaults changed, so these two cases
    # run all four scripts.
    "agg_router.sh": ({"FRONTEND_ARGS": "--model-aliases short=tiny,ghost=nothing"}, 2),
    # one by one, as engines sharing a GPU start: each worker registers (the prefill worker
    # unhealthy alone) before the next one starts; KV pushed by the prefill engine (nixl-push), the
    # mode for engines on one host (test_disagg covers the pull mode)
    "disagg_router.sh": (
        {
            **DISAGG,
            "ONE_BY_ONE": "1",
            "PREFILL_WORKERS": "1",
            "DECODE_WORKERS": "1",
            "CONNECTOR": "nixl-push",
        },
        2,
    ),
}


REFERENCE = want_reference(
    "launch", [{"kind": "completion", "input": PROMPT, "params": {"max_tokens": 16, "temperature": 0}}]
)


@pytest.fixture(scope="module")
def expected(references):
    return references[REFERENCE][0][0]


def _as_from_a_terminal() -> None:
    # A suite started in the background inherits SIGINT ignored, and bash cannot trap a signal
    # ignored at its start: the script gets Ctrl-C as a terminal would deliver it.
    child_preexec()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Launch:
    """One launch script run as an operator runs it, its output in a log file."""

    def __init__(self, script: str, model: Path, log_dir: Path, env: dict) -> None:
        self.port = free_port()
        self.namespace = f"launch{self.port}"
        self.log = log_dir / "launch.out"
        full = {
            **os.environ,
            "MODEL": str(model),
            "SERVED_NAME": "tiny",
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(self.port),
            "NATS_PORT": str(free_port()),
            "NAMESPACE": self.namespace,
            "ENGINE_ARGS": " ".join(ENGINE_ARGS),
            "LOG_DIR": str(log_dir),
            "READY_TIMEOUT": "400",
            **env,
        }
        self.fh = open(self.log, "wb")
        self.p = subprocess.Popen(
            ["bash", str(LAUNCH / script)], stdout=self.fh, stderr=subprocess.STDOUT, env=full,
            preexec_fn=_as_from_a_terminal,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        self.nats_url = f"nats://127.0.0.1:{full['NATS_PORT']}"
        self.seen: set[int] = set()

    def text(self) -> str:
        return self.log.read_bytes().decode(errors="replace")

    def remember(self) -> None:
        try:
            self.seen |= {c.pid for c in psutil.Process(self.p.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.remember()
            exited = self.p.poll() is not None
            found = re.search(pattern, self.text(), re.M)
            if found:
                return found.group(0)
            if exited:
                raise AssertionError(f"script exited with {self.p.returncode}:\n{self.text()[-4000:]}")
            time.sleep(0.5)
        raise AssertionError(f"no {pattern!r} after {timeout}s:\n{self.text()[-4000:]}")

    def stop(self) -> int:
        """Ctrl-C as a terminal sends it; anything the script failed to stop is killed (and counted)."""
        self.remember()
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
        try:
            return self.p.wait(120)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait()
        finally:
            self.fh.close()

    def leftovers(self) -> list[int]:
        alive = wait_gone(sorted(self.seen), timeout=10)
        for pid in alive:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        return alive


@pytest.mark.parametrize("script", list(TOPOLOGIES))
def test_launch_script_serves_and_stops(script, tiny_model, expected, tmp_path):
    env, workers = TOPOLOGIES[script]
    model = tiny_model
    if script == "agg_router.sh":  # a model whose generation config sets sampling defaults
        model = tmp_path / "model"
        shutil.copytree(tiny_model, model)
        gen = model / "generation_config.json"
        gen.write_text(json.dumps({**json.loads(gen.read_text()), "temperature": 0.0, "max_new_tokens": 5}))
    run = Launch(script, model, tmp_path, env)
    try:
        ready = run.wait_for(r"^ready: http://\S+/v1", 400)
        assert ready == f"ready: http://127.0.0.1:{run.port}/v1"
        health = httpx.get(run.url + "/health").json()
        assert health["workers"] == workers, health
        assert run.text().count("started ") == workers + 2  # NATS, frontend, workers: one process each
        if env.get("ONE_BY_ONE"):
            waits = re.findall(r"^(started \S+|waiting for \d+)", run.text(), re.M)
            want = [
                "started prefill-0",
                "waiting for 1",
                "started decode-0",
                "waiting for 2",
                "waiting for 2",
            ]
            assert waits[-5:] == want, waits
        client = openai.OpenAI(base_url=run.url + "/v1", api_key="none", max_retries=0)
        first, again = (
            client.completions.with_raw_response.create(
                model="tiny", prompt=PROMPT, max_tokens=16, temperature=0
            )
            for _ in range(2)
        )
        assert [r.parse().choices[0].text for r in (first, again)] == [expected, expected]
        if script == "agg_router.sh":  # a short name for the model, as the gateway configuration uses
            assert [m.id for m in client.models.list().data] == ["short", "tiny"]
            aliased = client.completions.create(model="short", prompt=PROMPT, max_tokens=16, temperature=0)
            assert aliased.choices[0].text == expected
            with pytest.raises(openai.NotFoundError, match="ghost"):
                client.completions.create(model="ghost", prompt=PROMPT, max_tokens=4)
            # What a request leaves out comes from the model's generation config, as with
            # `vllm serve`: no temperature is its 0 (greedy), no max_tokens its max_new_tokens.
            plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16)
            assert plain.choices[0].text == expected
            chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
            assert (chat.choices[0].finish_reason, chat.usage.completion_tokens) == ("length", 5)
        if "disagg" in script:  # the prompt's KV came from the prefill worker
            assert first.headers["x-dynvllm-prefill"].startswith("remote:"), dict(first.headers)
        if script == "disagg_router.sh":  # the KV router knows the decode worker now holds it all
            assert again.headers["x-dynvllm-prefill"] == "skipped_cached", dict(again.headers)
            # The one pushed prompt, in whole 32-token blocks, as the prefill worker counted its
            # WRITEs (the GPU scripts' probe, in this service's namespace); the decode side
            # drives no transfer in push mode.
            moved = kv_probe(run.nats_url, run.namespace, model)
            blocks = -(-first.parse().usage.prompt_tokens // 32)
            assert moved["prefill"]["tokens"] == blocks * 32, moved
            assert moved["prefill"]["transfers"] >= 1 and moved["prefill"]["ms_per_1000_tokens"] > 0, moved
            assert moved["decode"]["tokens"] == 0 and moved["prefill"]["failed"] == 0, moved
        if "disagg" not in script:  # the repeat finds its prefix cached where the router sent it
            assert again.parse().usage.prompt_tokens_details.cached_tokens >= 32
    finally:
        code = run.stop()
        left = run.leftovers()
    assert code == 130, run.text()[-3000:]
    assert "stopping" in run.text()
    assert not left, f"processes left behind: {left}"


def test_a_worker_that_cannot_start_stops_the_rest(tmp_path):
    run = Launch("agg.sh", tmp_path / "no-such-model", tmp_path, {})
    try:
        run.wait_for(r"^stopping", 180)
        code = run.p.wait(120)
    finally:
        run.stop()
        left = run.leftovers()
    out = run.text()
    assert code == 1, out[-3000:]
    assert "launch: agg-0 exited; last lines of" in out and "no-such-model" in out
    assert not left, f"processes left behind: {left}"
