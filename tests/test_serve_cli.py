"""`rdserve serve` as a real process: zero-configuration start and its failure message."""

from __future__ import annotations

import httpx

from models.artifact import load_artifact
from tests.procs import free_port, rdserve, wait_http


def test_zero_config_fits_the_default_chain_then_serves(tiny_esm_dirs, tmp_path):
    port = free_port()
    env = {
        "RDSERVE_MODELS": ",".join(str(p) for p in tiny_esm_dirs),
        "RDSERVE_DATA_DIR": str(tmp_path / "data"),
        "RDSERVE_FIT_SEQUENCES": "60",
        "RDSERVE_DEVICE": "cpu",
        "RDSERVE_PORT": str(port),
    }
    api = rdserve("serve", env=env, log=tmp_path / "serve.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health/ready", api, timeout=120)
        art_path = tmp_path / "data" / "artifacts" / "esm2-tiny32-tiny48-tiny64.safetensors"
        art = load_artifact(art_path)
        assert (
            art.fitting["source"] == "uniref90_sample_1k.fasta" and art.fitting["n_sequences"] == 60
        )
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "MKV"}, timeout=30)
        assert r.json()["model"] == "esm2-tiny32-tiny48-tiny64"
    finally:
        api.stop()
    out = api.output()
    assert "fitting esm2: tiny32 (32) → tiny48 (48) → tiny64 (64) on 60 sequences" in out
    assert '"msg":"request"' in out and '"request_id"' in out  # JSON access log
    assert "MKV" not in out  # no sequences in logs


def test_unobtainable_weights_stop_with_one_clear_message(tmp_path):
    """ESM-2 asked for explicitly (never overridden) with the hub unreachable: detected at once
    (no minute of retries), one clear message. Unasked, UniRep is served instead
    (tests/test_first_contact.py)."""
    env = {
        "RDSERVE_FAMILY": "esm2",
        "RDSERVE_DATA_DIR": str(tmp_path / "data"),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "",
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # refused: the hub is blocked
        "RDSERVE_PORT": str(free_port()),
    }
    p = rdserve("serve", env=env, log=tmp_path / "serve.log")
    code = p.p.wait(120)
    p.stop()
    out = p.output()
    assert code == 2, out
    assert "cannot load model weights for 8M (facebook/esm2_t6_8M_UR50D)" in out
    assert "local model directories" in out and "HF_HOME" in out and "RDSERVE_FAMILY=unirep" in out
    assert "Traceback" not in out
