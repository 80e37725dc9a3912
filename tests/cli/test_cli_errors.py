"""Commands that fail say so in one line and exit 2: an unreachable NATS within --timeout, a
folder that cannot be written, a model folder that does not exist."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.helpers import free_port

#: Every command that reaches a running service through NATS.
NATS_COMMANDS = [
    ["status"],
    ["status", "--json"],
    ["lora", "list"],
    ["lora", "load", "a", "--source", "/tmp"],
    ["lora", "unload", "a"],
    ["kv", "clear"],
    ["worker", "sleep", "w1"],
    ["worker", "wake", "w1"],
]


def dynvllm(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dynvllm", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(p: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def test_commands_give_up_on_an_unreachable_nats_after_the_timeout():
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    # Together: each waits its second; one after another they would take far longer.
    procs = [dynvllm(*cmd, "--nats-url", url, "--timeout", "1") for cmd in NATS_COMMANDS]
    for cmd, p in zip(NATS_COMMANDS, procs, strict=True):
        code, out, err = finish(p)
        assert code == 2, (cmd, out, err)
        assert err.splitlines() == [
            f"error: cannot reach NATS at {url} within 1 s: is the service running there? "
            "(--timeout waits longer)"
        ], (cmd, err)
        assert out == ""
    assert time.monotonic() - started < 30  # not retrying forever


def test_the_timeout_has_a_default():
    code, out, _ = finish(dynvllm("status", "--help"))
    assert code == 0 and "--timeout" in out and "10.0" in out


def test_model_tiny_into_a_folder_that_cannot_be_made_is_one_line():
    code, out, err = finish(dynvllm("model", "tiny", "/proc/nope"))
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot create the folder /proc/nope: "), err


def test_serve_with_a_missing_model_folder_says_so(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    code, _, err = finish(dynvllm("serve", "agg", "--model", str(missing)))
    assert code == 2
    assert err.splitlines() == [f"error: the model folder '{missing}' does not exist"]
    (tmp_path / "weights.bin").write_bytes(b"x")
    code, _, err = finish(dynvllm("serve", "agg", "--model", str(tmp_path / "weights.bin")))
    assert code == 2 and "is a file; give the folder that holds its config.json" in err
    assert "Repo id" not in err and "Traceback" not in err


def test_a_worker_that_dies_during_start_up_is_named_with_its_exit_code_and_last_lines(tiny_model):
    """A worker whose fixed metrics port is taken dies at start-up; `serve` says which process,
    how it ended and what it printed last, instead of "a process died"."""
    import re
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = dynvllm(
            *("serve", "agg", "--model", str(tiny_model), "--engine", "sim", "--namespace", "dies"),
            *("--metrics-port", str(port), "--http-host", "127.0.0.1", "--http-port", str(free_port())),
        )
        code, _, err = finish(p, timeout=180)
    assert code == 1, err
    head = r"start-up failed: agg \(pid (\d+)\) exited with code 1; its last lines:\n"
    m = re.search(head + r"((?:  \| .*\n)+)", err)
    assert m, err
    assert "Address already in use" in m.group(2)
    assert "stopping the service" in err


def test_exit_codes_and_signals_are_named():
    from dynvllm.supervisor import exit_text

    assert exit_text(1) == "exited with code 1"
    assert exit_text(-9) == "was killed by SIGKILL"
    assert exit_text(-15) == "was killed by SIGTERM"
