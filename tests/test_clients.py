"""docs/clients.md, run as written: every python and bash block of the page against a live server
(real HTTP, API keys on, the tiny ESM-2 chain) — openai sync and async, LangChain, LiteLLM, curl."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from tests.helpers import wait_ready
from tests.procs import free_port

DOC = Path(__file__).resolve().parents[1] / "docs" / "clients.md"
KEY = secrets.token_urlsafe(16)


def recipes() -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every fenced python/bash block of the page."""
    out, heading = [], ""
    for part in re.split(r"^(## .*)$", DOC.read_text(), flags=re.M):
        if part.startswith("## "):
            heading = part[3:].strip()
            continue
        for lang, code in re.findall(r"```(python|bash)\n(.*?)```", part, flags=re.S):
            out.append((heading, lang, code))
    return out


RECIPES = recipes()


@pytest.fixture(scope="module")
def live(tiny_artifact) -> Iterator[str]:
    """The embedded app with an API key, served by uvicorn over real HTTP."""
    from app.bootstrap import embedded_service
    from app.http.app import create_app
    from app.settings import Settings
    from models.artifact import load_artifact

    settings = Settings(artifact=tiny_artifact, device="cpu", api_keys=KEY)
    app = create_app(embedded_service(settings, load_artifact(tiny_artifact)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    with httpx.Client(base_url=base) as client:
        wait_ready(client)
    yield base
    server.should_exit = True
    thread.join(30)


def test_the_page_has_a_recipe_for_every_client():
    headings = {h for h, _, _ in RECIPES}
    assert {"OpenAI (sync)", "OpenAI (async)", "LangChain", "LiteLLM"} <= headings
    assert any(lang == "bash" and "x-npy" in code for _, lang, code in RECIPES)


@pytest.mark.parametrize(("heading", "lang", "code"), RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe_runs_against_a_live_server(live, tmp_path, heading, lang, code):
    env = {
        **os.environ,
        "RDSERVE_URL": live,
        "RDSERVE_API_KEY": KEY,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        # The bash recipe's `python` is this interpreter.
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    argv = (
        [sys.executable, "-c", code]
        if lang == "python"
        else ["bash", "-euo", "pipefail", "-c", code]
    )
    p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"{heading}:\n{p.stdout}\n{p.stderr}"
