"""kv_probe.py NATS_URL NAMESPACE MODEL_DIR [before.json] -- the NIXL transfer counters of the decode
and the prefill workers of one service (a pull connector counts on the decode side, which READs;
the push connector on the prefill side, which WRITEs), summed per role.

Without a baseline prints them as JSON (save it); with one prints, per role, the difference as
bytes, tokens, transfers, seconds, MB/s and milliseconds per 1,000 tokens moved (tokens from the
bytes and the model's KV shape: layers x 2 x kv heads x head dim x 2 bytes). A baseline of `{}`
reports the totals since the workers started.

Exits with an error when the namespace has no prefill or decode worker: counters of no worker
would read as zero transfers."""

import asyncio
import json
import sys

from dynvllm.cli.status import collect, worker_stats
from dynvllm.settings import build_settings

ROLES = ("decode", "prefill")


async def counters(url: str, namespace: str) -> dict:
    s = build_settings({"runtime": {"nats_url": url, "namespace": namespace}})
    rows = [r for r in await collect(s, wait=0.5) if r["role"] in ROLES]
    if not rows:
        sys.exit(f"kv_probe: no prefill or decode worker in namespace {namespace!r} at {url}")
    total: dict = {role: {} for role in ROLES}
    for row in rows:
        stats = (await worker_stats(row)).get("kv_transfer") or {}
        for key, (n, v) in stats.items():
            t = total[row["role"]].setdefault(key, [0, 0.0])
            t[0] += n
            t[1] += v
    return total


def main() -> None:
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    url, namespace, model = sys.argv[1:4]
    now = asyncio.run(counters(url, namespace))
    if len(sys.argv) < 5:
        print(json.dumps(now))
        return
    before = json.load(open(sys.argv[4]))
    cfg = json.load(open(f"{model}/config.json"))
    for role, counts in now.items():
        was = before.get(role, {})
        diff = {k: [v[0] - was.get(k, [0, 0])[0], v[1] - was.get(k, [0, 0])[1]] for k, v in counts.items()}
        report(role, diff, cfg)


def report(role: str, d: dict, cfg: dict) -> None:
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 2
    moved, secs = d.get("bytes_transferred", [0, 0])[1], d.get("transfer_duration", [0, 0])[1]
    tokens = moved / per_token
    out = {
        "role": role,
        "bytes": moved,
        "tokens": tokens,
        "transfers": d.get("transfer_duration", [0, 0])[0],
        "seconds": secs,
        "MB_s": moved / secs / 1e6 if secs else None,
        "ms_per_1000_tokens": secs * 1000 / (tokens / 1000) if tokens else None,
        "failed": d.get("num_failed_transfers", [0, 0])[0],
    }
    print("KV " + json.dumps(out))


if __name__ == "__main__":
    main()
