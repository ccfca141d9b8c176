"""Shared benchmark plumbing: random-weight ESM-2 at real sizes, interleaved timing, results."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import procs  # noqa: F401 — the tests' process helpers, for the service benchmarks

REPO = Path(__file__).resolve().parents[1]

# RDSERVE_SHARED_DATA: where ../shared/data is not beside the checkout (the lent GPU machine).
SHARED = Path(os.environ.get("RDSERVE_SHARED_DATA") or REPO.parent / "shared" / "data")
UNIREF = SHARED / "sequences" / "uniref90_sample_10k.fasta"
ESM2_CONFIGS = SHARED / "esm2"
CACHE = REPO / "benchmarks" / ".cache"
RESULTS = REPO / "benchmarks" / "results"

#: Real ESM-2 architectures (hidden, layers, heads). Configs for 8M–650M ship in shared/; 3B/15B
#: differ only in these numbers.
ESM2_SIZES: dict[str, tuple[int, int, int]] = {
    "8M": (320, 6, 20),
    "35M": (480, 12, 20),
    "150M": (640, 30, 20),
    "650M": (1280, 33, 20),
    "3B": (2560, 36, 40),
    "15B": (5120, 48, 40),
}


def random_esm2(size: str, layers: int | None = None, root: Path = CACHE) -> Path:
    """A random-weight ESM-2 of a real size saved like a hub checkpoint (cached on disk)."""
    hidden, n_layers, heads = ESM2_SIZES[size]
    n_layers = layers or n_layers
    out = root / f"esm2-{size}-L{n_layers}-random"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, EsmConfig, EsmForMaskedLM

    cfg = EsmConfig.from_pretrained(ESM2_CONFIGS / "esm2_t6_8M_UR50D")
    cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads = hidden, n_layers, heads
    cfg.intermediate_size = 4 * hidden
    torch.manual_seed(hash(size) % 2**31)
    EsmForMaskedLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(ESM2_CONFIGS / "esm2_t6_8M_UR50D").save_pretrained(out)
    return out


def tiny_esm2(hidden: int, root: Path = CACHE) -> Path:
    """A tiny random ESM-2 (2 layers, 4 heads) as in the tests: measures service overhead."""
    out = root / f"esm2-tiny{hidden}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, EsmConfig, EsmForMaskedLM

    cfg = EsmConfig.from_pretrained(ESM2_CONFIGS / "esm2_t6_8M_UR50D")
    cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads = hidden, 2, 4
    cfg.intermediate_size = 2 * hidden
    torch.manual_seed(hidden)
    EsmForMaskedLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(ESM2_CONFIGS / "esm2_t6_8M_UR50D").save_pretrained(out)
    return out


def uniref(n: int | None = None, max_len: int = 1022, seed: int | None = None) -> list[str]:
    """UniRef90 sample sequences (≤ max_len, validated); a seeded random subset when seed given."""
    from models.sequences import ALPHABET, read_fasta

    seqs = [s for _, s in read_fasta(UNIREF) if len(s) <= max_len and set(s) <= set(ALPHABET)]
    if seed is not None:
        random.Random(seed).shuffle(seqs)
    return seqs[:n] if n else seqs


def summary(values: list[float]) -> dict[str, float]:
    """Median with min–max and the raw repetitions."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "reps": values,
    }


def interleaved(
    arms: dict[str, Callable[[], float]], reps: int, warmup: bool = True
) -> dict[str, list[float]]:
    """Run each arm once per repetition, alternating order (A B, B A, …): fair under drift."""
    names = list(arms)
    if warmup:
        for n in names:
            arms[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else reversed(names):
            out[n].append(arms[n]())
    return out


def ratio_summary(num: list[float], den: list[float]) -> dict[str, float]:
    """Per-repetition ratios num/den (paired within a repetition), summarised."""
    return summary([a / b for a, b in zip(num, den, strict=True)])


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; threads included)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_mb(pid: int) -> float | None:
    """Resident memory (VmRSS) of a process in MiB; None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            kb = next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:"))
    except (OSError, StopIteration):  # gone, or a zombie (which has no VmRSS line)
        return None
    return kb / 1024


class PeakRss(threading.Thread):
    """Peak resident memory (MiB) of named processes, sampled every 20 ms from start() to
    stop(), which returns the peaks."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak = pids, dict.fromkeys(pids, 0.0)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], process_rss_mb(pid) or 0.0)
            time.sleep(0.02)

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        return self.peak


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),  # the machine's usable cores, not torch's threads
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save(name: str, data: dict[str, Any], command: str, results: Path = RESULTS) -> Path:
    """<results>/<name>.json with machine, git revision and the reproducing command."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    payload = {
        "benchmark": name,
        "command": command,
        "git": git_rev(),
        "machine": machine(),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def fmt_range(s: dict[str, float], spec: str = ".3g") -> str:
    return f"{s['median']:{spec}} ({s['min']:{spec}}–{s['max']:{spec}})"
