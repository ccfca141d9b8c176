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
