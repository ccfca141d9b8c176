"""Helpers the tests (and benchmarks) import: tiny random-weight ESM-2 models built from the
real configs and tokenizer, sequences, probes of a running app, reference scaler files.

Fixtures live in conftest.py; anything a test imports lives here or in procs.py / harness.py.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np

# RDSERVE_SHARED_DATA: where ../shared/data is not beside the checkout (the lent GPU machine).
SHARED = Path(
    os.environ.get("RDSERVE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
ESM2_DIR = SHARED / "esm2" / "esm2_t6_8M_UR50D"
UNIREF = SHARED / "sequences" / "uniref90_sample_10k.fasta"
TINY_DIMS = (32, 48, 64)


def make_tiny_esm(out: Path, hidden: int, seed: int) -> Path:
    """Save a random-weight ESM-2 (real config and tokenizer, tiny sizes) like a hub checkpoint."""
    import torch
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


def random_protein(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(lo, hi)))


def wait_ready(client, timeout: float = 60.0) -> dict:
    """Poll /health/ready of a TestClient (or httpx client) until it answers 200."""
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


def write_scaler(directory, d_in, d_out, name_in, name_out, regressor, rng, pca="fbpca", n="1k"):
    """A scaler in the reference layout: sklearn attribute names, columns/rows as documented."""
    keys = {
        "pca__mean_": rng.normal(size=d_out),
        "pca__components_": np.linalg.qr(rng.normal(size=(d_out, d_out)))[0][: d_out - d_in],
    }
    if regressor == "pcr":
        n_pcs = d_in - 2
        keys |= {
            "regressor__input_mean_": rng.normal(size=d_in),
            "regressor__output_mean_": rng.normal(size=d_out),
            "regressor__input_components_": np.linalg.qr(rng.normal(size=(d_in, d_in)))[0],
            "regressor__n_significant_pcs_": np.array(n_pcs),
            "regressor__coef_": rng.normal(size=(d_out, n_pcs)),
            "regressor__intercept_": rng.normal(size=d_out) * 0.1,
        }
    else:
        keys |= {
            "regressor__coef_": rng.normal(size=(d_out, d_in)),
            "regressor__intercept_": rng.normal(size=d_out),
        }
    path = directory / f"rd-scaler-{name_in}-{name_out}-{regressor}-{pca}-{n}.npz"
    np.savez(path, **keys)
    return dict(np.load(path))


def make_task(
    id_: str, artifact: str, items: list, deadline: float | None = None, pooling: str = "mean"
):
    """A Task of mean-pooled (or ``pooling``) items under the truncate policy."""
    from app.core.tasks import Task
    from models.sequences import LongSequencePolicy, Pooling

    deadline = deadline if deadline is not None else time.time() + 60
    return Task(id_, artifact, Pooling(pooling), LongSequencePolicy.truncate, items, deadline)
