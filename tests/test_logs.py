"""dynvllm's log setup: its own level, other libraries at WARNING, JSON lines with request ids."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import asyncio, logging
from dynvllm import logs
logs.setup("debug", "{fmt}", "frontend")
log = logging.getLogger("dynvllm.frontend")

async def request(rid):
    logs.REQUEST_ID.set(rid)
    await asyncio.sleep(0)
    log.debug("serving")

async def main():
    await asyncio.gather(request("a1"), request("b2"))
    log.info("outside any request")
    logging.getLogger("other.library").info("not shown: other libraries stay at WARNING")
    logging.getLogger("other.library").warning("shown")

asyncio.run(main())
"""


def run(fmt: str) -> list[str]:
    r = subprocess.run(
        [sys.executable, "-c", CODE.format(fmt=fmt)], capture_output=True, text=True, check=True
    )
    return r.stderr.splitlines()


def test_json_lines_carry_each_tasks_request_id():
    lines = [json.loads(line) for line in run("json")]
    assert [(x["logger"], x["level"], x["message"], x.get("request_id")) for x in lines] == [
        ("dynvllm.frontend", "debug", "serving", "a1"),
        ("dynvllm.frontend", "debug", "serving", "b2"),
        ("dynvllm.frontend", "info", "outside any request", None),
        ("other.library", "warning", "shown", None),
    ]
    assert all(x["process"] == "frontend" and x["pid"] > 0 and x["time"].endswith("Z") for x in lines)


def test_text_lines_name_the_request():
    lines = run("text")
    assert lines[0].endswith("dynvllm.frontend DEBUG serving [request a1]")
    assert lines[2].endswith("dynvllm.frontend INFO outside any request")
    assert len(lines) == 4
