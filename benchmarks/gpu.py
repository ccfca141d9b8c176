"""GPU benchmark: ESM-2 at real sizes (random weights), bf16 vs fp32, sized for < 8 min on one H100.

Measures, through rdserve's own Extractor/Embedder code paths:
  * residues/s per level (8M, 35M, 150M, 650M, 3B) in bf16 and fp32, and peak GPU memory;
  * RD-k vs the raw forward of the same chain prefix (mean-pooled and per-residue);
  * a batch token-budget sweep (throughput and peak memory) on 650M bf16;
  * attention kernels: SDPA (flash / memory-efficient) vs eager, and torch.compile vs eager.

    python benchmarks/gpu.py                 # on the GPU machine (writes benchmarks/results/gpu.json)
    python benchmarks/gpu.py --smoke         # seconds on CPU with tiny models (CI keeps it alive)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script

from benchmarks.common import ESM2_CONFIGS, ESM2_SIZES, RESULTS, machine, uniref
from models.artifact import Artifact
from models.embedder import Embedder
from models.extract import Extractor, Pooling
from models.families.base import Level
from models.families.esm2 import ESM2Family
from models.rd import StepParams, StepStats

SMOKE_SIZES = {
    "8M": (32, 2, 4),
    "35M": (48, 2, 4),
    "150M": (64, 2, 4),
    "650M": (80, 2, 4),
    "3B": (96, 2, 4),
}


def esm_config(size: str, smoke: bool) -> Any:
    from transformers import EsmConfig

    hidden, layers, heads = (SMOKE_SIZES if smoke else ESM2_SIZES)[size]
    cfg = EsmConfig.from_pretrained(ESM2_CONFIGS / "esm2_t6_8M_UR50D")
    cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads = hidden, layers, heads
    cfg.intermediate_size = 4 * hidden
    return cfg


def build_family(sizes: list[str], device: str, dtype: str, attn: str, smoke: bool) -> ESM2Family:
    """A chain whose models are random-weight EsmModels built directly on the device.

    Real checkpoints would go through ``from_pretrained``; for timing, random weights of the
    real shapes are equivalent and a 3B model is created in seconds instead of written to disk.
    """
    from transformers import EsmModel

    # model_id only locates the tokenizer (the real ESM-2 vocabulary in shared/); weights below.
    tok_dir = str(ESM2_CONFIGS / "esm2_t6_8M_UR50D")
    levels = [Level(s, (SMOKE_SIZES if smoke else ESM2_SIZES)[s][0], tok_dir) for s in sizes]
    fam = ESM2Family(levels, device=device, dtype=dtype, attn_implementation=attn)
    for i, s in enumerate(sizes):
        cfg = esm_config(s, smoke)
        cfg._attn_implementation = attn
        torch.manual_seed(i)
        with torch.device(fam.device):
            model = EsmModel(cfg, add_pooling_layer=False).to(fam.dtype).eval()
        fam._models[i] = model  # bypass from_pretrained (see docstring)
    return fam


def random_artifact(fam: ESM2Family) -> Artifact:
    """Random orthonormal projections of the right shapes (timing does not need a real fit)."""
    rng = np.random.default_rng(0)
    steps, stats = [], []
    for a, b in zip(fam.levels, fam.levels[1:], strict=False):
        v = np.linalg.qr(rng.normal(size=(b.dim, b.dim)))[0][: b.dim - a.dim]
        steps.append(
            StepParams(
                rng.normal(size=(b.dim, a.dim)) / np.sqrt(a.dim),
                rng.normal(size=a.dim),
                rng.normal(size=b.dim),
                np.zeros(b.dim),
                v,
            )
        )
        stats.append(StepStats(None, None, None, None))
    return Artifact("esm2", fam.levels, tuple(steps), tuple(stats), "random", sha256="random")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_it(fn: Any, dev: torch.device, reps: int, budget_s: float) -> list[float]:
    """Warm once, then up to ``reps`` timed runs within ``budget_s`` seconds."""
    fn()
    sync(dev)
    out: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(out) < reps and (not out or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def peak_mem_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_mem_gb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def per_level(
    seqs: list[str], sizes: list[str], dtype: str, args: argparse.Namespace
) -> dict[str, Any]:
    out = {}
    residues = sum(map(len, seqs))
    for s in sizes:
        fam = build_family([s], args.device, dtype, "sdpa", args.smoke)
        ex = Extractor(fam, args.budget)
        plans, _ = ex.plan(seqs)
        peak_mem_reset(fam.device)
        ts = time_it(
            lambda ex=ex, plans=plans: [ex.run(p, [0], Pooling.mean) for p in plans],
            fam.device,
            args.reps,
            args.point_seconds,
        )
        out[s] = {
            "residues_per_s": residues / statistics.median(ts),
            "reps": len(ts),
            "peak_gb": peak_mem_gb(fam.device),
        }
        print(
            f"  {dtype} {s}: {out[s]['residues_per_s']:,.0f} res/s, peak {out[s]['peak_gb']} GB",
            flush=True,
        )
        del fam, ex
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def rd_vs_raw(seqs: list[str], sizes: list[str], args: argparse.Namespace) -> dict[str, Any]:
    fam = build_family(sizes, args.device, "bf16" if not args.smoke else "fp32", "sdpa", args.smoke)
    emb = Embedder(fam, random_artifact(fam), token_budget=args.budget)
    ex = emb.extractor
    plans, _ = ex.plan(seqs)
    last = len(sizes) - 1
    res = {}
    for pooling in (Pooling.mean, Pooling.per_residue):
        raw, rd = [], []
        for r in range(args.reps):  # interleaved A/B
            arms = [
                ("raw", lambda p=pooling: [ex.run(pl, list(range(last + 1)), p) for pl in plans]),
                ("rd", lambda p=pooling: emb.compute(seqs, stop=last, pooling=p)),
            ]
            for name, fn in arms if r % 2 == 0 else reversed(arms):
                t = time_it(fn, fam.device, 1, 0)[0]
                (raw if name == "raw" else rd).append(t)
        ratios = [a / b for a, b in zip(raw, rd, strict=True)]
        res[str(pooling)] = {
            "rd_over_raw": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        }
        print(f"  RD/raw {pooling}: {res[str(pooling)]}", flush=True)
    return {"chain": sizes, **res}


def budget_sweep(seqs: list[str], size: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    fam = build_family(
        [size], args.device, "bf16" if not args.smoke else "fp32", "sdpa", args.smoke
    )
    residues = sum(map(len, seqs))
    rows = []
    for budget in args.sweep:
        ex = Extractor(fam, budget)
        plans, _ = ex.plan(seqs)
        peak_mem_reset(fam.device)
        ts = time_it(
            lambda ex=ex, plans=plans: [ex.run(p, [0], Pooling.mean) for p in plans],
            fam.device,
            args.reps,
            args.point_seconds,
        )
        rows.append(
            {
                "budget": budget,
                "batches": len(plans),
                "residues_per_s": residues / statistics.median(ts),
                "peak_gb": peak_mem_gb(fam.device),
            }
        )
        print(f"  budget {budget}: {rows[-1]}", flush=True)
    return rows


def kernels(seqs: list[str], size: str, args: argparse.Namespace) -> dict[str, Any]:
    residues = sum(map(len, seqs))
    out: dict[str, Any] = {}
    for attn in ("sdpa", "eager"):
        fam = build_family(
            [size], args.device, "bf16" if not args.smoke else "fp32", attn, args.smoke
        )
        ex = Extractor(fam, args.budget)
        plans, _ = ex.plan(seqs)
        ts = time_it(
            lambda ex=ex, plans=plans: [ex.run(p, [0], Pooling.mean) for p in plans],
            fam.device,
            args.reps,
            args.point_seconds,
        )
        out[attn] = residues / statistics.median(ts)
        if attn == "sdpa" and not args.no_compile:
            fam._models[0] = torch.compile(fam._models[0], dynamic=True)
            t0 = time.perf_counter()
            ex.run(plans[0], [0], Pooling.mean)
            sync(fam.device)
            out["compile_first_batch_s"] = time.perf_counter() - t0
            ts = time_it(
                lambda ex=ex, plans=plans: [ex.run(p, [0], Pooling.mean) for p in plans],
                fam.device,
                args.reps,
                args.point_seconds,
            )
            out["sdpa_compiled"] = residues / statistics.median(ts)
        print(f"  kernels {size}: {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU (seconds)")
    ap.add_argument("--sizes", default="8M,35M,150M,650M,3B")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--n-seqs", type=int, default=512)
    ap.add_argument("--budget", type=int, default=32768, help="tokens per batch")
    ap.add_argument("--sweep", default="8192,16384,32768,65536,131072")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--point-seconds", type=float, default=20.0, help="time cap per measurement")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n_seqs, args.budget, args.reps, args.point_seconds = 6, 2048, 1, 1.0
        args.sweep, args.no_compile = "1024,2048", True
        if args.out == RESULTS / "gpu.json":
            args.out = RESULTS / "gpu-smoke.json"
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    args.sweep = [int(x) for x in args.sweep.split(",")]
    sizes = args.sizes.split(",")
    dtypes = [d for d in args.dtypes.split(",") if args.device == "cuda" or d == "fp32"] or ["fp32"]
    seqs = uniref(args.n_seqs, max_len=1022, seed=5)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine(),
        "device": args.device,
        "smoke": args.smoke,
        "sequences": len(seqs),
        "residues": sum(map(len, seqs)),
        "budget": args.budget,
        "command": " ".join(["python", *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a run cut short still leaves its numbers
        result["wall_s"] = time.perf_counter() - t0
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    result["per_level"] = {}
    for d in dtypes:
        result["per_level"][d] = per_level(seqs, sizes, d, args)
        save()
    result["rd_vs_raw"] = rd_vs_raw(seqs, sizes[:3], args)
    save()
    sweep_size = "650M" if "650M" in sizes else sizes[-1]
    result["budget_sweep"] = {"size": sweep_size, "rows": budget_sweep(seqs, sweep_size, args)}
    save()
    kernel_size = "150M" if "150M" in sizes else sizes[0]
    result["kernels"] = {"size": kernel_size, **kernels(seqs, kernel_size, args)}
    save()
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
