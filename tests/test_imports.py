"""The API side of distributed mode must not load torch (start-up time and memory)."""

from __future__ import annotations

import subprocess
import sys

from procs import REPO


def test_api_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import app.cli, app.server, app.bootstrap, app.streams, app.cache, app.service\n"
        "import models.artifact, models.blocks, models.cli\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
