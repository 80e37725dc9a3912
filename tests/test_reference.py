"""The manual's generated pages match the code, and every DYN_* variable the docs, scripts and
manifests name is one dynvllm reads."""

from __future__ import annotations

import re
from pathlib import Path

from dynvllm import reference
from dynvllm import settings as S

ROOT = Path(__file__).resolve().parents[1]
# Variables read outside the settings model (state folder, plugin allow-list, installer, child hand-off,
# the router index's holders table). DYN_PORT belongs to the Dynamo peer kit that
# scripts/bench_overhead.sh drives.
OTHER = {
    "DYN_ROUTER_INDEX",
    "DYN_STATE_DIR",
    "DYN_LOAD_PLUGINS",
    "DYN_INSTALL_TARGET",
    "DYN_INTERNAL_SETTINGS_JSON",
    "DYN_PORT",
    "DYN_TEST_PROCESSES",
}


def test_cli_and_configuration_pages_are_current():
    assert reference.stale() == [], "run: python -m dynvllm.reference"


def test_configuration_page_names_every_setting():
    page = (ROOT / "docs" / "configuration.md").read_text()
    for group in S.groups().values():
        for name in group.model_fields:
            assert f"`{S.env_name(name)}`" in page and f"`{S.flag_name(name)}`" in page


def test_every_dyn_variable_mentioned_exists():
    known = {S.env_name(f) for g in S.groups().values() for f in g.model_fields} | OTHER
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "scripts").rglob("*.sh")]
    files += [*(ROOT / "deploy").rglob("*.yaml")]
    unknown = {}
    for path in files:
        for var in set(re.findall(r"\bDYN_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())):
            if var not in known:
                unknown.setdefault(var, path.relative_to(ROOT).as_posix())
    assert not unknown, f"named but not read by dynvllm: {unknown}"
