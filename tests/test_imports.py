"""The API side of distributed mode must not load torch (start-up time and memory)."""

from __future__ import annotations

import subprocess
import sys

from tests.procs import REPO


def test_api_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import app.cli, app.http.app, app.bootstrap, app.transport.dispatcher\n"
        "import app.core.cache, app.core.service\n"
        "import models.artifact, models.blocks\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_the_distributed_api_wiring_does_not_import_torch(tiny_artifact):
    """What `rdserve serve --redis-url` runs before serving (family resolution, the artifact,
    the service, bulk jobs, the app) — the family resolution once pulled torch in (+190 MB)."""
    code = (
        "import sys\n"
        "from app.settings import Settings\n"
        "from app.bootstrap import resolve_family, load_served_artifact, distributed_service\n"
        "from app.http.app import create_app\n"
        f"s = Settings(artifact={str(tiny_artifact)!r}, redis_url='redis://127.0.0.1:1/0')\n"
        "s, _ = resolve_family(s)\n"
        "create_app(distributed_service(s, load_served_artifact(s)))\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
