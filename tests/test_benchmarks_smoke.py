"""The benchmark scripts run (tiny, CPU) so they cannot rot; their numbers are not checked here."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.procs import REPO


def run_script(*args: str) -> None:
    """A benchmark as a `python -m benchmarks.…` process from the checkout; raises if it fails."""
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True, timeout=300)


def test_gpu_script_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    run_script("-m", "benchmarks.gpu", "--smoke", "--out", str(out))
    res = json.loads(out.read_text())
    # Every row of issue 17's target table has its arm (numbers unchecked: tiny models, CPU).
    assert set(res["precision"]["per_residue"]) == {"8M", "35M", "150M"}
    for layout in ("padded", "packed"):
        for pooling in ("mean", "per_residue"):
            assert res["rd_vs_raw"][layout][pooling]["rd_over_raw"]["median"] > 0
    assert res["padding"]["one_drain"]["packed"] < res["padding"]["one_drain"]["padded"]
    assert res["recompiles"]["recompiles_per_1000_batches"] == 0
    assert {"padded", "packed", "compiled"} <= set(res["forward"]["3B"])
    assert res["ready"]["first"]["start_to_ready_s"] > 0


def test_benchmark_suite_quick(tmp_path):
    p = subprocess.run(
        [
            "bash",
            "benchmarks/run",
            "extraction",
            "batching",
            "fit",
            "service",
            "coldstart",
            "--quick",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("extraction", "batching", "fit", "service", "coldstart"):
        res = json.loads((tmp_path / f"{name}-quick.json").read_text())
        assert res["command"].startswith(f"benchmarks/run {name}") and res["machine"]["cpu"]
    assert "RD-k / raw chain throughput" in p.stdout and "Speed-up" in p.stdout
    assert "CPU seconds per 1,000 residues" in p.stdout


def test_contention_script_quick(tmp_path):
    run_script("-m", "benchmarks.contention", "--quick", "--results-dir", str(tmp_path))
    res = json.loads((tmp_path / "contention-quick.json").read_text())
    noise = ("none", "17% of a core", "33% of a core")
    assert set(res["residues_per_s"]) == {
        f"{t}, {n}" for t in ("2 threads", "1 thread") for n in noise
    }
    assert res["over_quiet"]["1 thread, none"]["median"] == 1.0
    assert set(res["one_over_two_threads"]) == set(noise)


def test_first_contact_script(tmp_path, unirep_cache):
    run_script(
        "-m", "benchmarks.first_contact", "--reps", "1", "--fit", "",
        "--cache-dir", str(unirep_cache), "--results-dir", str(tmp_path),
    )  # fmt: skip
    res = json.loads((tmp_path / "first_contact.json").read_text())
    assert res["shipped"]["median"] > 0 and res["fit_on_start"] == {}
