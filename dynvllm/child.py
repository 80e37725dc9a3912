"""Entry point of the child processes `dynvllm serve` starts: `python -m dynvllm.child KIND [ROLE]`.

Settings arrive whole in the environment, so a child sees exactly what its parent resolved.
"""

from __future__ import annotations

import os
import sys

from dynvllm.envnames import SETTINGS_ENV


def main(argv: list[str]) -> int:
    from dynvllm.settings import Settings

    settings = Settings.from_json(os.environ.pop(SETTINGS_ENV))
    if argv[0] == "frontend":
        from dynvllm.frontend.server import run_frontend

        return run_frontend(settings)
    if argv[0] == "worker":
        from dynvllm.worker.service import run_worker

        return run_worker(settings, argv[1])
    raise SystemExit(f"unknown child kind {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
