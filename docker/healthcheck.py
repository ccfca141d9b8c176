#!/usr/bin/env python3
"""Container health check (the image has no curl): exit 0 when an HTTP GET answers 2xx.

URL: the first argument, else $RDSERVE_HEALTH_URL, else http://127.0.0.1:$RDSERVE_PORT/health/live
(the API's liveness route). A worker serves /health/live on its metrics port (503 when its loop
stalls): compose sets RDSERVE_HEALTH_URL=http://127.0.0.1:9100/health/live for workers.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def health_url(argv: list[str]) -> str:
    """The URL to probe, from the argument or the environment."""
    if len(argv) > 1:
        return argv[1]
    port = os.environ.get("RDSERVE_PORT") or "8000"
    return os.environ.get("RDSERVE_HEALTH_URL") or f"http://127.0.0.1:{port}/health/live"


def main(argv: list[str]) -> int:
    """0 when healthy, 1 otherwise (one line on stderr saying why)."""
    url = health_url(argv)
    timeout = float(os.environ.get("RDSERVE_HEALTH_TIMEOUT") or 4)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            if 200 <= r.status < 300:
                return 0
            print(f"unhealthy: {url} answered {r.status}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 — any failure means unhealthy
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
