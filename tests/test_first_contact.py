"""A fresh machine, online or not: the default family follows the weights that can be had (hub
blocked here), an explicit family is never overridden, the offline default serves the shipped
artifact at once, threads follow the CPUs this process may use, defaults belong to the family."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.procs import free_port, rdserve, wait_http

REPO = Path(__file__).resolve().parents[1]
ESM2_DEFAULT = ("facebook/esm2_t6_8M_UR50D", "facebook/esm2_t12_35M_UR50D")


@pytest.fixture
def hub_blocked(monkeypatch, tmp_path):
    """No RDSERVE_* settings, an empty Hugging Face cache, offline mode off, and a hub endpoint
    nothing listens on (connection refused at once)."""
    from huggingface_hub import constants

    for k in list(os.environ):
        if k.startswith("RDSERVE_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # restored afterwards (go_offline sets it)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return constants


def fill_hf_cache(root: Path, repo: str) -> None:
    """A model in the Hugging Face cache layout (refs/main → snapshots/<commit>/files)."""
    d = root / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text("0" * 40)
    snap = d / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snap / f).write_text("{}")


def test_default_family_falls_back_to_unirep_when_the_hub_is_unreachable(hub_blocked):
    from app.bootstrap import resolve_family
    from app.settings import Settings

    s, how = resolve_family(Settings())
    assert s.family == "unirep" and how.startswith("fallback:")
    assert "hub is unreachable" in how and "RDSERVE_FAMILY" in how
    # Later loads go straight to the local cache: no minute of connection retries.
    assert hub_blocked.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"


def test_hf_hub_offline_is_honoured_without_touching_the_network(hub_blocked, monkeypatch):
    from app.bootstrap import resolve_family
    from app.settings import Settings
    from models.families import esm2

    def no_network(*_a, **_k):
        raise AssertionError("probed the hub although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(esm2, "hub_reachable", no_network)
    monkeypatch.setattr(hub_blocked, "HF_HUB_OFFLINE", True)
    s, how = resolve_family(Settings())
    assert s.family == "unirep" and "HF_HUB_OFFLINE" in how


def test_filled_hf_cache_keeps_the_esm2_default(hub_blocked, tmp_path):
    from app.bootstrap import resolve_family
    from app.settings import Settings
    from models.families.esm2 import ESM2_PRESETS

    for name in ("8M", "35M", "150M"):
        fill_hf_cache(tmp_path / "hf", ESM2_PRESETS[name][0])
    s, how = resolve_family(Settings())
    assert s.family == "esm2" and how.startswith("default")
    assert hub_blocked.HF_HUB_OFFLINE is False  # everything was local: no probe, no switch


@pytest.mark.parametrize(
    "explicit", [{"family": "esm2"}, {"models": "8M,35M"}, {"artifact": "/some/file"}]
)
def test_an_explicit_choice_is_never_overridden(hub_blocked, explicit):
    from app.bootstrap import resolve_family
    from app.settings import Settings

    s, how = resolve_family(Settings(**explicit))
    assert s.family == "esm2" and not how.startswith("fallback")


def test_fresh_clone_offline_serves_the_shipped_unirep_artifact(unirep_cache, tmp_path):
    """`make serve` on a fresh clone with the hub unreachable: no settings, empty data dir and
    HF cache, offline mode not set — ready without a fit, and a real request answered."""
    port = free_port()
    env = {
        "RDSERVE_PORT": str(port),
        "RDSERVE_DEVICE": "cpu",
        "RDSERVE_DATA_DIR": str(tmp_path / "data"),
        "RDSERVE_CACHE_DIR": str(unirep_cache),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "",
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # refused: the hub is blocked
    }
    base = f"http://127.0.0.1:{port}"
    proc = rdserve("serve", env=env, log=tmp_path / "serve.log")
    try:
        wait_http(f"{base}/health/ready", proc, timeout=240)
        r = httpx.post(
            f"{base}/v1/embeddings",
            json={"input": ["MKTAYIAKQRQISFVKSHFSRQ"], "dimensions": 300},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["family"] == "unirep" and body["model"] == "unirep-64-256-1900"
        assert body["levels"] == ["64", "256", "1900"] and len(body["data"][0]["embedding"]) == 300
        card = httpx.get(f"{base}/v1/models").json()["data"][0]
        assert card["family"] == "unirep" and card["family_selection"].startswith("fallback")
        info = httpx.get(f"{base}/info").json()
        assert info["limits"]["token_budget"] == 32768  # UniRep's own default
    finally:
        proc.stop()
    log = proc.output()
    assert "serving the shipped default artifact" in log and "fitting" not in log, log[-3000:]
    assert "serving unirep" in log and not (tmp_path / "data" / "artifacts").exists()


def test_shipped_artifact_records_its_provenance():
    """What scripts/build_default_artifact.py pins, as the shipped file records it."""
    from app.bootstrap import packaged_sequences
    from models.artifact import load_artifact
    from models.sequences import sequences_digest
    from models.specs import family_spec

    spec = family_spec("unirep")
    path = spec.shipped_artifact_path
    assert path is not None and path.is_file()
    art = load_artifact(path)
    assert art.family == "unirep" and tuple(lv.name for lv in art.levels) == spec.default_models
    fit = art.fitting
    assert fit["data_sha256"] == sequences_digest(packaged_sequences(1000))
    assert fit["n_sequences"] == 1000 and fit["source"] == "uniref90_sample_1k.fasta"
    assert fit["token_budget"] == spec.token_budget("cpu") == 32768
    recorded = (path.parent / "SHA256SUMS").read_text().split()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == recorded[recorded.index(path.name) - 1]


def test_defaults_that_depend_on_the_family_belong_to_it(tiny_esm_dirs):
    from models.batching import default_token_budget
    from models.extract import Extractor
    from models.families import build_chain

    assert default_token_budget("cpu", "unirep") == 32768
    assert default_token_budget("cpu", "esm2") == 1536
    assert default_token_budget("cuda", "esm2") == 16384
    unirep = build_chain("unirep", models=["64"], device="cpu")
    esm = build_chain("esm2", models=[str(tiny_esm_dirs[0])], device="cpu")
    assert Extractor(unirep).token_budget == 32768 and Extractor(esm).token_budget == 1536


def run_python(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_threads_default_to_the_cpus_this_process_may_use():
    # One CPU in the affinity mask: torch's own default (the core count) would oversubscribe it.
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        "from models.families.base import available_cpus, set_threads; import torch;"
        "print(available_cpus(), set_threads(None), torch.get_num_threads())"
    )
    assert run_python(code, OMP_NUM_THREADS="") == "1 1 1"
    code = "from models.families.base import set_threads; import torch; set_threads(3); "
    code += "print(torch.get_num_threads())"
    assert run_python(code) == "3"
    # OMP_NUM_THREADS, where an operator (or a test harness) set it, is the default.
    code = "from models.families.base import set_threads; print(set_threads(None))"
    assert run_python(code, OMP_NUM_THREADS="1") == "1"


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path, files, quota):
    from models.families.base import _cgroup_cpu_quota

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cgroup_cpu_quota(tmp_path) == quota


def test_threads_setting_reaches_the_embedder(tiny_artifact):
    code = (
        "from app.bootstrap import make_embedder; from app.settings import Settings;"
        "from models.artifact import load_artifact; import torch;"
        f"s = Settings(artifact={str(tiny_artifact)!r}, device='cpu', threads=1);"
        "make_embedder(s, load_artifact(s.artifact)); print(torch.get_num_threads())"
    )
    assert run_python(code) == "1"


def test_a_fit_on_first_start_logs_its_progress(tiny_esm_dirs, tmp_path, caplog, monkeypatch):
    """A missing artifact of a configured chain is fitted on start: its progress is log lines
    (with rate and ETA), which show however stdout is connected."""
    import logging

    import app.bootstrap as boot
    from app.settings import Settings

    monkeypatch.setattr(boot, "FIT_LOG_EVERY_S", 0.0)
    s = Settings(
        models=",".join(str(d) for d in tiny_esm_dirs),
        data_dir=tmp_path,
        fit_sequences=12,
        token_budget=1024,
        device="cpu",
    )
    with caplog.at_level(logging.INFO, logger="app.bootstrap"):
        path = boot.ensure_artifact(s)
    assert path.is_file()
    ticks = [r for r in caplog.records if r.getMessage() == "fitting"]
    assert len(ticks) >= 2 and ticks[-1].sequences_done == 12
    assert [t.sequences_done for t in ticks] == sorted(t.sequences_done for t in ticks)
    assert all(t.residues_per_s > 0 and t.eta_s is not None for t in ticks)
