"""Shared fixtures: tiny random-weight ESM-2 models built from the real configs and tokenizer."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

# Tests never use the hub (unreachable here): fail fast instead of retrying connections.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# RDSERVE_SHARED_DATA: where ../shared/data is not beside the checkout (the lent GPU machine).
SHARED = Path(
    os.environ.get("RDSERVE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
ESM2_DIR = SHARED / "esm2" / "esm2_t6_8M_UR50D"
UNIREF = SHARED / "sequences" / "uniref90_sample_10k.fasta"
TINY_DIMS = (32, 48, 64)


def make_tiny_esm(out: Path, hidden: int, seed: int) -> Path:
    """Save a random-weight ESM-2 (real config and tokenizer, tiny sizes) like a hub checkpoint."""
    from transformers import AutoTokenizer, EsmConfig, EsmForMaskedLM

    cfg = EsmConfig.from_pretrained(ESM2_DIR)
    cfg.hidden_size = hidden
    cfg.num_hidden_layers = 2
    cfg.num_attention_heads = 4
    cfg.intermediate_size = 2 * hidden
    torch.manual_seed(seed)
    model = EsmForMaskedLM(cfg).eval()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(ESM2_DIR).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_esm_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny-esm2")
    return [make_tiny_esm(root / f"tiny{d}", d, seed=i) for i, d in enumerate(TINY_DIMS)]


def random_protein(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(lo, hi)))


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


@pytest.fixture
def make_app(tiny_artifact):
    """Factory: (TestClient context, service) for an embedded app with settings overrides."""
    from fastapi.testclient import TestClient

    from app.bootstrap import embedded_service
    from app.server import create_app
    from app.settings import Settings
    from models.artifact import load_artifact

    def make(**overrides):
        settings = Settings(**{"artifact": tiny_artifact, "device": "cpu", **overrides})
        service = embedded_service(settings, load_artifact(tiny_artifact))
        return TestClient(create_app(service)), service

    return make


def wait_ready(client, timeout: float = 60.0) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/health/ready")
        if r.status_code == 200:
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"not ready: {r.json()}")


def metric(client, name: str, **labels) -> float:
    """Current value of one Prometheus sample scraped from /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server on a free port (no persistence) that the test may stop and restart."""
    from procs import RedisServer

    server = RedisServer(tmp_path).start()
    yield server
    server.stop()
