"""`vllm serve` command lines carried over: the rewriting (pure), and the flags' errors through
`python -m dynvllm` (exit code and message)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dynvllm.cli.vllm_cmdline import CommandLineError, normalize


def _run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "dynvllm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _flat(text: str) -> str:
    """The message on one line, without the frame Typer draws around errors."""
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


# ---- the rewriting -------------------------------------------------------------------------


def test_a_positional_model_is_the_model():
    assert normalize(["serve", "agg", "Qwen/Qwen3-0.6B", "--workers", "2"]) == [
        "serve",
        "agg",
        "--model",
        "Qwen/Qwen3-0.6B",
        "--workers",
        "2",
    ]
    assert normalize(["serve", "agg", "--model", "m"]) == ["serve", "agg", "--model", "m"]
    with pytest.raises(CommandLineError, match="given twice"):
        normalize(["serve", "agg", "a", "--model", "b"])


def test_more_served_names_become_aliases(monkeypatch):
    monkeypatch.delenv("DYN_MODEL_ALIASES", raising=False)
    out = normalize(["serve", "agg", "m", "--served-model-name", "a", "b", "c", "--workers", "2"])
    assert out == [
        "serve",
        "agg",
        "--model",
        "m",
        "--served-model-name",
        "a",
        "--workers",
        "2",
        "--model-aliases",
        "b=a,c=a",
    ]
    merged = normalize(["serve", "agg", "--model-aliases", "x=y", "--served-model-name", "a", "b"])
    assert merged == ["serve", "agg", "--model-aliases", "x=y,b=a", "--served-model-name", "a"]
    monkeypatch.setenv("DYN_MODEL_ALIASES", "q=a")
    assert normalize(["serve", "agg", "--served-model-name", "a", "b"])[-2:] == ["--model-aliases", "q=a,b=a"]
    assert normalize(["serve", "agg", "--served-model-name", "a"]) == [
        "serve",
        "agg",
        "--served-model-name",
        "a",
    ]


def test_a_config_file_goes_under_the_command_lines_own_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: from-file\nhttp_port: 9000\nenforce-eager: true\nenable-prefix-caching: false\n"
        "served-model-name: [a, b]\nhf-overrides: {rope_theta: 2}\nmax-num-seqs: 8\n"
    )
    out = normalize(["serve", "agg", "--config", str(cfg), "--http-port", "9001"])
    assert out[:2] == ["serve", "agg"]
    rest = out[2:]
    assert rest[:4] == ["--model", "from-file", "--http-port", "9000"]
    assert "--enforce-eager" in rest and "--no-enable-prefix-caching" in rest
    assert rest[rest.index("--hf-overrides") + 1] == '{"rope_theta": 2}'
    assert rest[rest.index("--served-model-name") + 1] == "a" and rest[-2:] == ["--model-aliases", "b=a"]
    # The explicit flag comes after the file's: the last value is the one taken.
    ports = [rest[i + 1] for i, a in enumerate(rest) if a == "--http-port"]
    assert ports == ["9000", "9001"]
    # A positional model wins over the file's.
    out = normalize(["serve", "agg", "cli-model", f"--config={cfg}"])
    assert out[2:4] == ["--model", "cli-model"] and "from-file" not in out


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("c.json", "{}", "must be YAML"),
        ("missing.yaml", None, "No such file"),
        ("bad.yaml", "a: [", "not valid YAML"),
        ("list.yaml", "- a\n", "mapping"),
    ],
)
def test_config_file_errors_name_the_file(tmp_path, name, text, needle):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(CommandLineError, match=needle) as exc:
        normalize(["serve", "agg", "--config", str(path)])
    assert str(path) in str(exc.value)


# ---- through the command -------------------------------------------------------------------


def test_config_values_reach_the_settings_and_explicit_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("http-port: 70000\n")
    r = _run("serve", "agg", "m", "--config", str(cfg))
    assert r.returncode == 2 and "--http-port" in r.stderr and "0-65535" in r.stderr, r.stderr
    # The explicit port wins: the command gets as far as the missing tool-call parser.
    r = _run("serve", "agg", "m", "--config", str(cfg), "--http-port", "8001", "--enable-auto-tool-choice")
    assert r.returncode == 2 and "--http-port" not in r.stderr, r.stderr
    assert "--enable-auto-tool-choice requires --tool-call-parser" in _flat(r.stderr)
    r = _run("serve", "agg", "m", "--config", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "error:" in r.stderr and "none.yaml" in r.stderr


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--ssl-keyfile", "k.pem"], ["--ssl-keyfile needs --ssl-certfile"]),
        (["--ssl-certfile", "/no/such.pem"], ["/no/such.pem: no such file"]),
        (["--chat-template", "no-such-template"], ["--chat-template", "not a file, nor a template"]),
        (["--chat-template", "{% for %}"], ["--chat-template", "does not compile"]),
        (["--uvicorn-log-level", "loud"], ["--uvicorn-log-level", "info"]),
    ],
)
def test_server_flags_are_checked_before_anything_starts(args, needles):
    r = _run("serve", "agg", "m", *args)
    assert r.returncode == 2, r.stderr
    flat = _flat(r.stderr)
    for needle in needles:
        assert needle in flat, flat


def test_a_vllm_server_flag_dynvllm_lacks_is_named_as_such(tiny_model):
    r = _run("serve", "agg", str(tiny_model), "--allowed-origins", '["*"]', "--api-server-count", "2")
    assert r.returncode == 2
    flat = _flat(r.stderr)
    assert "--allowed-origins, --api-server-count: flags of vLLM's server (vllm serve)" in flat, flat
    assert "does not implement" in flat and "--http-workers" in flat
    assert "unrecognized" not in flat


def test_several_api_keys_become_one_comma_separated_value():
    assert normalize(["serve", "agg", "m", "--api-key", "k1", "k2", "--workers", "2"]) == [
        "serve",
        "agg",
        "--model",
        "m",
        "--api-key",
        "k1,k2",
        "--workers",
        "2",
    ]
