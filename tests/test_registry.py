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
    # A group the list names nothing of stays whole: the default router policy is still there.
    assert "kv" in registry.names(registry.ROUTER_POLICIES)


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


@pytest.fixture
def plugin_groups_dist(tmp_path, monkeypatch):
    """A distribution with a router policy that reads its own settings group, and two groups
    that cannot be used (a clashing field, an import error)."""
    from dynvllm import settings as S

    (tmp_path / "fastest.py").write_text(
        textwrap.dedent("""
        from pydantic import Field
        from dynvllm.router.policies import Pick, Policy
        from dynvllm.settings import SettingsGroup

        class FastestSettings(SettingsGroup):
            fastest_bias: float = Field(0.5, ge=0, description="How much faster.")

        class Clash(SettingsGroup):
            router: str = "x"

        class Fastest(Policy):
            def __init__(self, settings):
                self.bias = settings.plugin("fastest").fastest_bias

            def choose(self, candidates, tokens, block_size, lora, load):
                return Pick(sorted(candidates)[0])
    """)
    )
    (tmp_path / "brokengroup.py").write_text("raise ImportError('no such thing')\n")
    info = tmp_path / "fastest-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fastest\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent("""
        [dynvllm.router_policies]
        fastest = fastest:Fastest

        [dynvllm.settings]
        fastest = fastest:FastestSettings
        clash = fastest:Clash
        broken = brokengroup:Group
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    S.reload_plugin_groups()
    yield tmp_path
    S.reload_plugin_groups()


def test_a_policy_plugin_reads_its_own_settings_group(plugin_groups_dist, monkeypatch):
    from dynvllm import settings as S
    from dynvllm.frontend.routing import Router

    assert "fastest" in registry.names(registry.ROUTER_POLICIES)
    assert "fastest" not in sys.modules  # the settings check reads names only
    monkeypatch.setenv("DYN_FASTEST_BIAS", "2.5")
    s = S.build_settings({"router": {"router": "fastest"}})
    router = Router(s)
    assert router.policy.bias == 2.5 and router.choose(["b", "a"]).worker == "a"


def test_unusable_settings_groups_are_left_out_with_their_reason(plugin_groups_dist):
    from dynvllm import settings as S

    groups = S.plugin_groups()
    assert "fastest" in groups and "clash" not in groups and "broken" not in groups
    s = S.build_settings()
    with pytest.raises(
        registry.PluginError, match=r"'router' \(--router / DYN_ROUTER\) is already a setting"
    ):
        s.plugin("clash")
    with pytest.raises(registry.PluginError, match="failed to import: ImportError: no such thing"):
        s.plugin("broken")


def test_unknown_policy_lists_the_installed_ones():
    from dynvllm.router.policies import make_policy
    from dynvllm.settings import RouterSettings, Settings

    s = Settings(router=RouterSettings())
    s.router.router = "fastest"  # past the settings check, as a stale settings file would be
    with pytest.raises(
        ValueError, match=r"no router policy plugin named 'fastest'; installed router policies: kv,"
    ):
        make_policy(s)
