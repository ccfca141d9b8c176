"""On a CUDA GPU only: real out-of-memory errors are split and retried, and isolated.

Skipped without a GPU (CI has none); run on a GPU machine with
``RDSERVE_SHARED_DATA=<shared/data> python -m pytest -s tests/test_cuda.py``.  The GPU's memory
is capped with ``torch.cuda.set_per_process_memory_fraction`` so that a large batch really
runs out of memory while smaller ones fit; nothing is simulated.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch

from models.blocks import ItemFailure
from models.embedder import Embedder
from models.families import build_chain
from models.fit import fit_artifact
from models.sequences import clean_sequences, read_fasta
from tests.helpers import SHARED, UNIREF

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def save_random_esm(name: str, out) -> str:
    """A random-weight ESM-2 of a real shape, saved like a hub checkpoint."""
    from transformers import AutoTokenizer, EsmConfig, EsmForMaskedLM

    torch.manual_seed(len(name))
    EsmForMaskedLM(EsmConfig.from_pretrained(SHARED / "esm2" / name)).save_pretrained(out)
    AutoTokenizer.from_pretrained(SHARED / "esm2" / "esm2_t6_8M_UR50D").save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """8M → 150M shapes on the GPU (bf16), loaded through from_pretrained, fitted for real."""
    root = tmp_path_factory.mktemp("esm")
    dirs = [save_random_esm(n, root / n) for n in ("esm2_t6_8M_UR50D", "esm2_t30_150M_UR50D")]
    family = build_chain("esm2", models=dirs, device="cuda", dtype="bfloat16")
    seqs = [s for s in clean_sequences(s for _, s in read_fasta(UNIREF, 500)) if len(s) <= 1000]
    art = fit_artifact(family, seqs[:200], token_budget=16384)
    return family, art, seqs[200:]


def cap_memory(total_bytes: float) -> None:
    """Let this process's caching allocator hold at most total_bytes of GPU memory."""
    torch.cuda.empty_cache()
    frac = min(1.0, total_bytes / torch.cuda.get_device_properties(0).total_memory)
    torch.cuda.set_per_process_memory_fraction(frac)


def peak_of(fn) -> tuple[float, float, object]:
    """(peak bytes allocated while fn ran, seconds, fn's result)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), time.perf_counter() - t0, out


def cosines(a: list, b: list) -> np.ndarray:
    x = np.stack([np.concatenate(i.blocks) for i in a]).astype(np.float64)
    y = np.stack([np.concatenate(i.blocks) for i in b]).astype(np.float64)
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


def test_real_oom_batches_are_split_and_retried(chain, caplog):
    family, art, seqs = chain
    seqs = seqs[:96]
    small, whole = Embedder(family, art, token_budget=4096), Embedder(family, art, 1 << 20)
    small.compute(seqs[:4], stop=1)  # load both levels first
    base = torch.cuda.memory_allocated()
    peak_small, t_small, want = peak_of(lambda: small.compute(seqs, stop=1))
    peak_whole, t_whole, _ = peak_of(lambda: whole.compute(seqs, stop=1))
    assert peak_whole - base > 4 * (peak_small - base)  # the one big batch needs far more

    # Cap between the two: the whole batch cannot fit, halves of halves can.
    cap_memory(base + 2.5 * (peak_small - base))
    caplog.set_level(logging.WARNING, logger="models.embedder")
    try:
        _, t_split, got = peak_of(lambda: whole.compute(seqs, stop=1))
    finally:
        cap_memory(float("inf"))
    splits = sum("retrying it in halves" in r.message for r in caplog.records)
    assert splits >= 1
    assert all(r.residues == w.residues for r, w in zip(got, want, strict=True))
    cos = cosines(got, want)  # bf16: other batch shapes, other rounding
    assert cos.min() > 0.99, cos.min()

    print(
        "CUDA_OOM_SPLIT "
        + json.dumps(
            {
                "gpu": torch.cuda.get_device_name(0),
                "sequences": len(seqs),
                "residues": sum(map(len, seqs)),
                "weights_gb": base / 2**30,
                "peak_gb_budget_4096": peak_small / 2**30,
                "peak_gb_one_batch": peak_whole / 2**30,
                "cap_gb": (base + 2.5 * (peak_small - base)) / 2**30,
                "seconds_budget_4096": t_small,
                "seconds_one_batch_uncapped": t_whole,
                "seconds_one_batch_capped_split": t_split,
                "splits": splits,
                "min_cosine_vs_reference": float(cos.min()),
            }
        )
    )


def reserved_peak(fn) -> float:
    """Peak bytes the caching allocator reserved while fn ran (what the memory cap limits)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_reserved()


def test_a_sequence_too_large_for_the_device_fails_alone(chain):
    family, art, seqs = chain
    emb = Embedder(family, art, token_budget=4096)
    long_seq = max(seqs, key=len)
    shorts = sorted(seqs, key=len)[:16]
    emb.compute(shorts[:2], stop=1)  # both levels loaded
    p_short = max(reserved_peak(lambda s=s: emb.compute([s], stop=1)) for s in shorts)
    p_long = reserved_peak(lambda: emb.compute([long_seq], stop=1))
    assert p_long > p_short
    cap_memory((p_short + p_long) / 2)
    try:
        out = dict(pair for done in emb.iter_compute([*shorts, long_seq], 1) for pair in done)
    finally:
        cap_memory(float("inf"))
    assert isinstance(out[16], ItemFailure) and out[16].out_of_memory, out[16]
    assert [i for i in range(16) if isinstance(out[i], ItemFailure)] == []
    # Uncapped again, the same model serves the long sequence: nothing was left broken.
    assert emb.compute([long_seq], stop=1)[0].residues == len(long_seq)
    print(
        "CUDA_OOM_ALONE "
        + json.dumps(
            {
                "long_sequence_residues": len(long_seq),
                "shortest_residues": [len(s) for s in shorts][:3],
                "reserved_gb_long_alone": p_long / 2**30,
                "reserved_gb_shorts_alone_max": p_short / 2**30,
                "error": out[16].message[:200],
            }
        )
    )


# ---- the fast path on the GPU (issue 17): packed flash-varlen batches, pinned copies, compile --


def tiny_on_cuda(tiny_artifact, dtype: str, packed: bool = False, compile=None) -> Embedder:
    from models.artifact import load_artifact

    art = load_artifact(tiny_artifact)
    family = build_chain("esm2", levels=list(art.levels), device="cuda", dtype=dtype)
    if packed or compile is not None:
        family.set_fast_path(packed=packed, compile=compile)
    return Embedder(family, art, token_budget=2048)


def short_proteins(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    aa = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    return ["".join(rng.choice(aa, int(rng.integers(5, 400)))) for _ in range(n)]


def test_packed_flash_varlen_equals_padded_sdpa(tiny_artifact):
    from models.extract import Pooling
    from models.families.varlen import flash_varlen_available

    seqs = short_proteins(40, 0)
    for dtype, min_cos in (("bfloat16", 0.999), ("float32", 0.99999)):
        padded = tiny_on_cuda(tiny_artifact, dtype)
        packed = tiny_on_cuda(tiny_artifact, dtype, packed=True)
        assert packed.pipeline_depth == 1  # launches run ahead of the copies on CUDA
        for pooling in (Pooling.mean, Pooling.per_residue):
            a = packed.compute(seqs, stop=2, pooling=pooling)
            b = padded.compute(seqs, stop=2, pooling=pooling)
            if pooling == Pooling.per_residue:
                x = np.concatenate([np.concatenate(i.blocks, -1) for i in a])
                y = np.concatenate([np.concatenate(i.blocks, -1) for i in b])
                cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
            else:
                cos = cosines(a, b)
            assert cos.min() > min_cos, (dtype, pooling, cos.min())
    probe = torch.zeros(1, 4, 8, 16, device="cuda", dtype=torch.bfloat16)
    print("CUDA_PACKED", json.dumps({"flash_varlen": flash_varlen_available(probe)}))


def test_pinned_pipelined_copies_equal_the_cpu_results(tiny_artifact):
    from models.artifact import load_artifact
    from models.extract import Pooling

    seqs = short_proteins(60, 1)
    gpu = tiny_on_cuda(tiny_artifact, "float32", packed=True)
    art = load_artifact(tiny_artifact)
    cpu = Embedder(build_chain("esm2", levels=list(art.levels), device="cpu"), art, 2048)
    for pooling in (Pooling.mean, Pooling.per_residue):
        for a, b in zip(
            gpu.compute(seqs, 2, pooling=pooling, k=60),
            cpu.compute(seqs, 2, pooling=pooling, k=60),
            strict=True,
        ):
            for x, y in zip(a.blocks, b.blocks, strict=True):
                np.testing.assert_allclose(x, y, atol=2e-4, rtol=1e-3)


def test_compiled_inductor_levels_on_cuda_do_not_recompile(tiny_artifact, tmp_path):
    from torch._dynamo.utils import counters

    from models.extract import Pooling
    from models.families.base import CompileOptions

    torch._dynamo.reset()
    emb = tiny_on_cuda(tiny_artifact, "bfloat16", compile=CompileOptions(cache_dir=tmp_path))
    eager = tiny_on_cuda(tiny_artifact, "bfloat16", packed=True)
    t0 = time.perf_counter()
    emb.warm(0)  # one level: its buckets are what the test needs (each graph costs seconds)
    warm_s = time.perf_counter() - t0
    frames = counters["frames"]["ok"]
    for seed in range(20):
        seqs = short_proteins(int(np.random.default_rng(seed).integers(1, 30)), 100 + seed)
        a = emb.compute(seqs, 0, pooling=Pooling.mean)
        b = eager.compute(seqs, 0, pooling=Pooling.mean)
        assert cosines(a, b).min() > 0.999
    assert counters["frames"]["ok"] == frames
    print("CUDA_COMPILE", json.dumps({"warm_s": warm_s, "graphs": frames}))
