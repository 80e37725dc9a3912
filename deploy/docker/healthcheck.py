"""Container health: the frontend's /live when this container serves HTTP, else the worker's
/metrics. DYN_HEALTH_URL overrides both. Exit 0 when healthy (Docker's HEALTHCHECK contract)."""

import os
import sys
import urllib.request


def candidates() -> list[str]:
    if os.environ.get("DYN_HEALTH_URL"):
        return [os.environ["DYN_HEALTH_URL"]]
    urls = [f"http://127.0.0.1:{os.environ.get('DYN_HTTP_PORT', '8000')}/live"]
    metrics = os.environ.get("DYN_METRICS_PORT", "")
    if metrics.isdigit() and int(metrics) > 0:
        urls.append(f"http://127.0.0.1:{metrics}/metrics")
    return urls


def main() -> int:
    for url in candidates():
        try:
            with urllib.request.urlopen(url, timeout=4) as r:
                if r.status == 200:
                    return 0
        except OSError:
            continue
    return 1


if __name__ == "__main__":
    sys.exit(main())
