"""What rendering chat templates as vLLM does costs the frontend, beside a plain sandboxed Jinja
environment (the frontend's former renderer), in fresh processes, side by side, several rounds:
import and compile time, resident memory added, and time per render of a chat prompt.

    .venv/bin/python scripts/template_render_cost.py MODEL_FOLDER [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

_CHILD = r"""
import json, sys, time
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
kind, folder = sys.argv[1], sys.argv[2]
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
r0, t0 = rss(), time.perf_counter()
if kind == "jinja":
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from pathlib import Path
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tpl = env.from_string((Path(folder) / "chat_template.jinja").read_text())
    render = lambda: tpl.render(messages=messages, add_generation_prompt=True)
else:
    from dynvllm.frontend.tokenizer import Tokenizer
    tok = Tokenizer(folder)  # imports the renderer and compiles the model's template
    render = lambda: tok.apply_chat_template(messages, add_generation_prompt=True)
render()
t1, r1 = time.perf_counter(), rss()
n = 2000
for _ in range(n):
    render()
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "rss_mib": r1 - r0, "render_us": (t2 - t1) / n * 1e6}))
"""


def _run(kind: str, folder: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, folder], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a model folder with tokenizer.json and chat_template.jinja")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {"jinja": [], "vllm-like": []}
    for _ in range(args.rounds):
        for kind in rows:  # alternate, so drift on a shared machine hits both
            rows[kind].append(_run("jinja" if kind == "jinja" else "transformers", args.model))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    for kind, m in med.items():
        spread = {x: (min(r[x] for r in rows[kind]), max(r[x] for r in rows[kind])) for x in m}
        print(
            f"{kind:10s} load {m['load_s']:.2f}s [{spread['load_s'][0]:.2f}-{spread['load_s'][1]:.2f}]  "
            f"+{m['rss_mib']:.0f} MiB  render {m['render_us']:.0f} us "
            f"[{spread['render_us'][0]:.0f}-{spread['render_us'][1]:.0f}]"
        )
    base, new = med["jinja"], med["vllm-like"]
    print(
        f"ratio (vllm-like / jinja): load x{new['load_s'] / base['load_s']:.1f}, "
        f"memory +{new['rss_mib'] - base['rss_mib']:.0f} MiB, "
        f"render x{new['render_us'] / base['render_us']:.2f}"
    )


if __name__ == "__main__":
    main()
