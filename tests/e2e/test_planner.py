"""The planner on the sim engine: `dynvllm profile` writes a profile; a ramp of load makes the
planner add a worker through the local connector, and the load's fall drains it, with no failed
request; a second planner stands by until the first leaves."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx

from dynvllm.planner.profile import Level, Point, Profile
from tests.helpers import SIM, Proc, free_port, start_agg, start_service, wait_http, wait_workers

SIM_ARGS = ("--sim-decode-ms-per-step", "5")


def test_profile_sweeps_one_sim_worker(tiny_model, tmp_path):
    out = tmp_path / "profile.json"
    proc = Proc(
        [
            "profile",
            "--model",
            str(tiny_model),
            "--served-model-name",
            "tiny",
            *SIM,
            *SIM_ARGS,
            "--isl",
            "32,128",
            "--osl",
            "4",
            "--concurrency",
            "1,4",
            "--requests",
            "8",
            "-o",
            str(out),
        ],
        tmp_path / "profile.log",
    )
    assert proc.p.wait(120) == 0, proc.tail()
    data = json.loads(out.read_text())
    points = data["roles"]["agg"]["points"]
    assert [(p["isl"], p["osl"]) for p in points] == [(32, 4), (128, 4)] and data["engine"] == "sim"
    for p in points:
        one, four = p["sweep"]
        assert (one["concurrency"], four["concurrency"]) == (1, 4)
        assert four["request_rate"] > one["request_rate"] > 0  # a batch serves more at once
        assert 0 < one["ttft_p50"] <= one["ttft_p90"]
        # Gaps near the sim's 5 ms step; a loaded host may read two tokens in one chunk (a gap
        # near 0 beside one near 10 ms), which moves p50 but not p90 below the step.
        assert 0 < one["itl_p50"] <= one["itl_p90"] and 0.004 < one["itl_p90"] < 0.1


def metric(url: str, name: str, labels: str = "") -> float | None:
    """A sample of a planner's metrics; None while it is not listening yet."""
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.ConnectError:
        return None
    m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class Load:
    """Open-loop requests at a rate that can change; every answer's status is kept."""

    def __init__(self, url: str, words: int = 2, max_tokens: int = 8) -> None:
        self.url, self.rate, self.statuses = url, 0.0, []
        self.words, self.max_tokens = words, max_tokens
        self.stop = False
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()

    async def _one(self, http: httpx.AsyncClient, i: int) -> None:
        try:
            prompt = " ".join(f"request {i} word {k}" for k in range(self.words // 4 + 1))
            body = {"model": "tiny", "prompt": prompt, "max_tokens": self.max_tokens, "ignore_eos": True}
            r = await http.post(self.url + "/v1/completions", json=body)
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == self.max_tokens
            self.statuses.append(r.status_code if ok or r.status_code != 200 else f"short: {r.text}")
        except httpx.HTTPError as exc:
            self.statuses.append(repr(exc))

    async def _run(self) -> None:
        tasks = set()
        async with httpx.AsyncClient(timeout=60) as http:
            i = 0
            while not self.stop:
                if self.rate <= 0:
                    await asyncio.sleep(0.05)
                    continue
                t = asyncio.create_task(self._one(http, i))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                i += 1
                await asyncio.sleep(1 / self.rate)
            await asyncio.gather(*tasks)

    def close(self) -> None:
        self.stop = True
        self.thread.join(60)


def planner(tmp_path, name: str, url: str, profile, port: int, ns: str = "plan", interval: float = 1) -> Proc:
    return Proc(
        [
            "planner",
            "--namespace",
            ns,
            "--frontend-url",
            url,
            "--planner-profile",
            str(profile),
            "--planner-interval",
            str(interval),
            "--predictor",
            "constant",
            "--cooldown",
            "2",
            "--scale-down-after",
            "2",
            "--min-workers",
            "1",
            "--max-workers",
            "2",
            "--planner-metrics-port",
            str(port),
        ],
        tmp_path / f"{name}.log",
    )


def test_a_ramp_adds_a_worker_and_its_end_drains_it(tiny_model, tmp_path):
    # One sim worker carries 4 req/s at the targets (a profile written here, so the test controls it).
    profile = tmp_path / "profile.json"
    level = Level(concurrency=4, request_rate=4.0, ttft_p50=0.05, ttft_p90=0.1, itl_p50=0.01, itl_p90=0.02)
    profile.write_text(json.dumps(Profile({"agg": [Point(16, 8, [level])]}).to_dict()))
    url, serve = start_agg(tiny_model, tmp_path / "serve.log", "plan", *SIM_ARGS, engine_args=SIM)
    ports = free_port(), free_port()
    planners: list[Proc] = []
    load = None
    try:
        wait_workers(serve, 1, timeout=60)
        metrics = [f"http://127.0.0.1:{p}" for p in ports]
        deadline = time.monotonic() + 20
        for k, name in enumerate(("planner-a", "planner-b")):  # the first to start is the one that acts
            planners.append(planner(tmp_path, name, url, profile, ports[k]))
            while metric(metrics[k], "dynvllm_planner_active") != (1.0 if k == 0 else 0.0):
                assert time.monotonic() < deadline, planners[k].tail()
                time.sleep(0.3)

        load = Load(url)
        load.rate = 7.0  # needs two workers
        t0 = time.monotonic()
        wait_workers(serve, 2, timeout=20)
        up = time.monotonic() - t0
        assert metric(metrics[0], "dynvllm_planner_decisions_total", '{action="up",role="agg"}') == 1
        assert metric(metrics[1], "dynvllm_planner_decisions_total", '{action="up",role="agg"}') == 0
        load.rate = 1.0  # one carries it, with room: the second drains while requests flow
        t0 = time.monotonic()
        wait_workers(serve, 1, timeout=20)
        print(
            f"ramp: second worker serving after {up:.1f} s, "
            f"deregistered {time.monotonic() - t0:.1f} s after the fall"
        )
        load.close()
        assert metric(metrics[0], "dynvllm_planner_decisions_total", '{action="down",role="agg"}') == 1
        assert load.statuses and set(load.statuses) == {200}, load.statuses
        deadline = time.monotonic() + 30  # deregistered at once; the process exits once drained
        while "drained and left" not in serve.tail(20000):
            assert time.monotonic() < deadline, serve.tail()
            time.sleep(0.3)

        # The active planner leaves: the standby takes over.
        assert planners[0].stop() == 0
        deadline = time.monotonic() + 10
        while metric(metrics[1], "dynvllm_planner_active") != 1.0:
            assert time.monotonic() < deadline, planners[1].tail()
            time.sleep(0.5)
    finally:
        if load is not None:
            load.close()
        for p in planners:
            p.stop()
        assert serve.stop() == 0


def test_idle_model_scales_to_zero_and_a_request_brings_a_worker_back(tiny_model, tmp_path):
    profile = tmp_path / "profile.json"
    level = Level(concurrency=4, request_rate=4.0, ttft_p50=0.05, ttft_p90=0.1, itl_p50=0.01, itl_p90=0.02)
    profile.write_text(json.dumps(Profile({"agg": [Point(16, 8, [level])]}).to_dict()))
    url, serve = start_agg(
        tiny_model, tmp_path / "serve.log", "zero", *SIM_ARGS, "--admission-timeout", "30", engine_args=SIM
    )
    port = free_port()
    plan = None
    try:
        wait_workers(serve, 1, timeout=60)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "warm", "max_tokens": 2})
        assert r.status_code == 200  # the frontend now knows the model
        plan = Proc(
            [
                "planner",
                "--namespace",
                "zero",
                "--frontend-url",
                url,
                "--planner-profile",
                str(profile),
                "--planner-interval",
                "0.5",
                "--predictor",
                "constant",
                "--cooldown",
                "1",
                "--scale-down-after",
                "1",
                "--min-workers",
                "0",
                "--idle-after",
                "2",
                "--planner-metrics-port",
                str(port),
            ],
            tmp_path / "planner.log",
        )
        deadline = time.monotonic() + 30
        while "drained and left" not in serve.tail(20000):
            assert time.monotonic() < deadline and serve.p.poll() is None, serve.tail() + plan.tail()
            time.sleep(0.3)
        assert httpx.get(url + "/health").json().get("workers", 0) == 0
        t0 = time.monotonic()
        r = httpx.post(
            url + "/v1/completions", json={"model": "tiny", "prompt": "cold", "max_tokens": 4}, timeout=60
        )
        cold = time.monotonic() - t0
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        assert cold < 30
        print(f"cold start: first answer after {cold:.2f} s")  # docs/benchmarks.md quotes it
        assert (
            metric(f"http://127.0.0.1:{port}", "dynvllm_planner_decisions_total", '{action="up",role="agg"}')
            == 1
        )
    finally:
        if plan is not None:
            plan.stop()
        assert serve.stop() == 0


def test_prefill_and_decode_ratios_change_under_load_without_a_failed_request(tiny_model, tmp_path):
    """The disaggregated topology on sim workers: prefill and decode counts go up and down (to no
    prefill worker and back) through the supervisor's control endpoint, the way the local
    connector asks, while long prompts flow; every request answers 200 with all its tokens."""
    ns = f"ratio{free_port()}"
    serve = start_service(
        ["serve", "disagg"],
        tmp_path / "serve.log",
        "--prefill",
        "2",
        "--decode",
        "2",
        "--disagg-min-prompt-tokens",
        "16",
        "--admission-timeout",
        "30",
        *SIM_ARGS,
        model=tiny_model,
        namespace=ns,
        engine_args=SIM,
    )
    url = serve.url
    assert url
    load = None

    def roles() -> dict:
        return httpx.get(url + "/health").json().get("roles", {}).get("tiny", {})

    def scale(role: str, count: int, prefill: int, decode: int) -> None:
        proc = Proc(["scale", "--namespace", ns, role, str(count)], tmp_path / f"scale-{role}-{count}.log")
        assert proc.p.wait(60) == 0, proc.tail()
        want = {k: v for k, v in (("prefill", prefill), ("decode", decode)) if v}
        wait_http(url + "/health", lambda b: b.get("roles", {}).get("tiny", {}) == want, serve, 60)
        time.sleep(1.0)  # requests flow over the new ratio

    try:
        wait_workers(serve, 4, timeout=240)
        load = Load(url, words=40)
        load.rate = 8.0
        time.sleep(1.0)
        # 2:2 -> 0:2 -> 0:1 -> 1:1 (starting workers is what takes time here: one start only)
        scale("prefill", 0, 0, 2)  # both drain: the decode workers compute the prompts
        scale("decode", 1, 0, 1)
        scale("prefill", 1, 1, 1)
        load.close()
        assert len(load.statuses) > 40 and set(load.statuses) == {200}, load.statuses
        hops = {
            m.group(1): float(m.group(2))
            for m in re.finditer(
                r'^dynvllm_disagg_prefill_total\{.*outcome="(\w+)"\} (\S+)$',
                httpx.get(url + "/metrics").text,
                re.M,
            )
        }
        # The prefill workers took the hop (the sim engine hands no KV over: no_transfer_params),
        # and none of it failed; with no prefill worker the hop was skipped, not an error.
        assert hops.get("no_transfer_params", 0) > 10 and hops.get("no_prefill_worker", 0) > 0, hops
        assert not {k for k in hops if "fail" in k or "error" in k}, hops
        assert roles() == {"prefill": 1, "decode": 1}
    finally:
        if load is not None:
            load.close()
        assert serve.stop() == 0


def test_a_killed_planner_is_replaced_by_the_standby_within_two_intervals(tiny_model, tmp_path):
    """kill -9 of the active planner while requests flow: no goodbye, its lease expires (2 s);
    the standby acts at its next interval, and then scales the service itself."""
    profile = tmp_path / "profile.json"
    level = Level(concurrency=4, request_rate=4.0, ttft_p50=0.05, ttft_p90=0.1, itl_p50=0.01, itl_p90=0.02)
    profile.write_text(json.dumps(Profile({"agg": [Point(16, 8, [level])]}).to_dict()))
    url, serve = start_agg(tiny_model, tmp_path / "serve.log", "kill", *SIM_ARGS, engine_args=SIM)
    interval = 3.0
    ports = free_port(), free_port()
    metrics = [f"http://127.0.0.1:{p}" for p in ports]
    planners: list[Proc] = []
    load = None
    try:
        wait_workers(serve, 1, timeout=60)
        deadline = time.monotonic() + 30
        for k, name in enumerate(("planner-a", "planner-b")):
            planners.append(planner(tmp_path, name, url, profile, ports[k], ns="kill", interval=interval))
            while metric(metrics[k], "dynvllm_planner_active") != (1.0 if k == 0 else 0.0):
                assert time.monotonic() < deadline, planners[k].tail()
                time.sleep(0.2)
        load = Load(url)
        load.rate = 1.0  # one worker carries it: nothing to change
        time.sleep(interval)
        planners[0].p.kill()
        t0 = time.monotonic()
        while metric(metrics[1], "dynvllm_planner_active") != 1.0:
            assert time.monotonic() - t0 < 4 * interval, planners[1].tail()
            time.sleep(0.1)
        took = time.monotonic() - t0
        print(f"standby active {took:.1f} s after the active planner was killed (interval {interval:.0f} s)")
        assert took <= 2 * interval + 0.5
        load.rate = 7.0  # now the former standby must act
        wait_workers(serve, 2, timeout=30)
        assert metric(metrics[1], "dynvllm_planner_decisions_total", '{action="up",role="agg"}') == 1
        load.close()
        assert load.statuses and set(load.statuses) == {200}, load.statuses
    finally:
        if load is not None:
            load.close()
        for p in planners:
            p.stop()
        assert serve.stop() == 0
