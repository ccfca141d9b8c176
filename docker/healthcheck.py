#!/usr/bin/env python3
"""Container health check (the image has no curl): exit 0 when an HTTP GET answers 2xx.

URL: the first argument, else $RDSERVE_HEALTH_URL, else the liveness route of whatever the
container runs: a worker serves /health/live on its metrics port (503 when its loop stalls),
http://127.0.0.1:$RDSERVE_METRICS_PORT (9100); the API on http://127.0.0.1:$RDSERVE_PORT (8000).
The role is read from the container's main process (/proc/1/cmdline), so the image's default
HEALTHCHECK is right for `rdserve worker` run without compose too.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path


def runs_worker(cmdline: Path = Path("/proc/1/cmdline")) -> bool:
    """Whether the container's main process is `rdserve worker` (NUL-separated argv)."""
    try:
        return "worker" in cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False


def health_url(argv: list[str], cmdline: Path = Path("/proc/1/cmdline")) -> str:
    """The URL to probe: the argument, $RDSERVE_HEALTH_URL, or the role's liveness route."""
    if len(argv) > 1:
        return argv[1]
    if os.environ.get("RDSERVE_HEALTH_URL"):
        return os.environ["RDSERVE_HEALTH_URL"]
    if runs_worker(cmdline):
        port = os.environ.get("RDSERVE_METRICS_PORT") or "9100"
    else:
        port = os.environ.get("RDSERVE_PORT") or "8000"
    return f"http://127.0.0.1:{port}/health/live"


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
