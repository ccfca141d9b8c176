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


def test_rooms_import_only_downwards():
    """docs/design.md's rules: models/ never imports app/; the core never imports the HTTP room
    or the transport (they import it, and bootstrap wires them together)."""
    import ast

    def imports(path):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                yield from (a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                yield node.module

    rules = {"models": ("app",), "app/core": ("app.http", "app.transport", "app.cli")}
    broken = [
        f"{path.relative_to(REPO)} imports {name}"
        for room, banned in rules.items()
        for path in sorted((REPO / room).rglob("*.py"))
        for name in imports(path)
        if any(name == b or name.startswith(b + ".") for b in banned)
    ]
    assert not broken, broken
