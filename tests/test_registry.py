"""The plugin registry over real entry points (a throwaway distribution on sys.path)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dynvllm import registry


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """A distribution with a good role, a role whose import raises, and a connector."""
    (tmp_path / "goodrole.py").write_text("class Role:\n    standalone = False\n")
    (tmp_path / "badrole.py").write_text("raise RuntimeError('missing CUDA toolkit 99')\n")
    info = tmp_path / "fakeplugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent("""
        [dynvllm.roles]
        goodrole = goodrole:Role
        badrole = badrole:Role
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_listing_does_not_import(fake_dist):
    rows = registry.installed(registry.ROLES)
    names = {r.name: r for r in rows}
    assert {"agg", "goodrole", "badrole"} <= set(names)
    assert names["badrole"].distribution == "fakeplugins" and names["badrole"].target == "badrole:Role"
    assert "badrole" not in sys.modules and "goodrole" not in sys.modules


def test_load_imports_only_the_chosen_plugin(fake_dist):
    role = registry.load(registry.ROLES, "goodrole")
    assert role.standalone is False
    assert "badrole" not in sys.modules


def test_import_error_inside_plugin_is_shown(fake_dist):
    with pytest.raises(
        registry.PluginError, match="failed to import: RuntimeError: missing CUDA toolkit 99"
    ) as info:
        registry.load(registry.ROLES, "badrole")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_unknown_plugin_lists_installed(fake_dist):
    with pytest.raises(
        registry.PluginError, match=r"no role plugin named 'nope'.*installed roles: .*agg.*goodrole"
    ):
        registry.load(registry.ROLES, "nope")


def test_allowlist(fake_dist, monkeypatch):
    monkeypatch.setenv("DYN_LOAD_PLUGINS", "agg")
    assert registry.names(registry.ROLES) == ["agg"]


def test_first_party_plugins_are_not_imported_by_core():
    r = subprocess.run(
        [sys.executable, "-m", "importlinter.cli", "--config", "pyproject.toml"]
        if False
        else [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "KEPT" in r.stdout


def test_vllm_loads_the_amx_request_in_its_processes():
    # vLLM's own loader, as its engine and model-worker processes call it; on a CPU with AMX the
    # process may then use AMX tiles (a one-token first step no longer dies with SIGILL).
    code = textwrap.dedent(
        """
        from vllm.plugins import load_plugins_by_group
        plugins = load_plugins_by_group("vllm.general_plugins")
        assert "dynvllm_amx" in plugins, sorted(plugins)
        plugins["dynvllm_amx"]()
        import torch
        if torch.cpu._is_amx_tile_supported():
            assert torch.cpu._init_amx()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]
