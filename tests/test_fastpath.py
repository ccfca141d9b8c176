"""The GPU fast path, run on CPU with tiny models: the centred projection's precision, packed
(variable-length attention) batches, the pipelined device → host copies and the cut to k dims,
and compiled levels on bucketed shapes.  The CUDA-only branches (FlashAttention's varlen
kernel, pinned copies on a side stream) are exercised by tests/test_cuda.py on a GPU."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from models.artifact import Artifact, load_artifact
from models.batching import bucket_tokens, plan_batches, plan_packed, token_buckets
from models.embedder import Embedder, warm_buckets
from models.extract import Extractor, ForwardStats, Pooling
from models.families import build_chain
from models.families.base import CompileOptions
from models.fit import fit_artifact
from models.projection import Projector
from models.rd import apply_chain
from models.sequences import LongSequencePolicy
from tests.helpers import make_tiny_esm, random_protein

EPS32 = float(np.finfo(np.float32).eps)

# ---- precision of the projection ----------------------------------------------------------


@pytest.fixture(scope="module")
def wide_chain(tmp_path_factory, fit_sequences):
    """ESM-2 8M → 35M widths (320 → 480; 2 layers each), fitted for real, and raw per-residue
    outputs of other sequences: the shapes where the fused projection lost precision."""
    root = tmp_path_factory.mktemp("wide")
    dirs = [str(make_tiny_esm(root / f"w{d}", d, seed=i)) for i, d in enumerate((320, 480))]
    family = build_chain("esm2", models=dirs, device="cpu")
    art = fit_artifact(family, fit_sequences[:40], token_budget=4096)
    ex = Extractor(family, 4096)
    plans, _ = ex.plan(fit_sequences[80:92])
    outs = [ex.run(p, [0, 1], Pooling.per_residue) for p in plans]
    raw = {lvl: torch.cat([o.levels[lvl] for o in outs]) for lvl in (0, 1)}
    return art, raw


def fused_projection(art: Artifact, raw: dict[int, torch.Tensor]) -> np.ndarray:
    """The projection as it was before centring (a = x Aᵀ + h Bᵀ + c, the means folded into
    c): kept here only to show that the bound below is one it fails."""
    s = art.steps[0]
    v, w = s.components, s.weight
    f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    c = v @ (w @ s.input_mean - s.output_mean - s.residual_mean)
    return torch.addmm(f32(c), raw[1], f32(v.T)).addmm_(raw[0], f32(-(v @ w).T)).numpy()


def block_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got − want| in units of float32 rounding at the block's scale (eps · max |want|)."""
    return float(np.abs(got - want).max() / (EPS32 * np.abs(want).max()))


def test_appended_blocks_are_within_a_few_float32_roundings_of_float64(wide_chain):
    art, raw = wide_chain
    want = apply_chain([raw[0].double().numpy(), raw[1].double().numpy()], list(art.steps))
    blocks = Projector(art).extend(None, raw, 0, 1)
    np.testing.assert_array_equal(blocks[0].numpy(), raw[0].numpy())  # level 1 is x_1 itself
    new = block_error(blocks[1].numpy(), want[:, 320:])
    old = block_error(fused_projection(art, raw), want[:, 320:])
    print(f"block [320:480] error in eps·max|ref|: centred {new:.1f}, fused (before) {old:.1f}")
    assert new <= 10 < old  # measured here: ~4 vs ~29


# ---- packed batches ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedders(tiny_artifact):
    """The same tiny chain as padded and as packed batches."""
    art = load_artifact(tiny_artifact)
    out = {}
    for packed in (False, True):
        family = build_chain("esm2", levels=list(art.levels), device="cpu")
        family.set_fast_path(packed=packed)
        out[packed] = Embedder(family, art, token_budget=600)
    return out


@pytest.fixture(scope="module")
def seqs():
    rng = random.Random(17)
    return [random_protein(rng, 5, 200) for _ in range(10)] + ["MKV" + "ACDEFGHIKL" * 110]


def assert_same_blocks(a, b, atol=1e-5):
    for x, y in zip(a, b, strict=True):
        assert x.residues == y.residues and x.handling == y.handling
        for bx, by in zip(x.blocks, y.blocks, strict=True):
            assert bx.shape == by.shape
            np.testing.assert_allclose(bx, by, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("pooling", list(Pooling))
def test_packed_equals_padded_and_the_float64_reference(embedders, seqs, pooling):
    chunk = LongSequencePolicy.chunk  # the last sequence (1,103 aa) runs as overlapping windows
    padded = embedders[False].compute(seqs, stop=2, pooling=pooling, policy=chunk)
    packed = embedders[True].compute(seqs, stop=2, pooling=pooling, policy=chunk)
    assert_same_blocks(packed, padded)
    assert packed[-1].handling == "chunked"
    # Reference: raw outputs of each sequence alone (no batch at all), projected in float64.
    ex = Extractor(embedders[False].family, 10_000)
    steps = list(embedders[False].artifact.steps)
    for i in (0, 4, 9):
        plans, _ = ex.plan([seqs[i]])
        raw = ex.run(plans[0], [0, 1, 2], pooling).levels
        want = apply_chain([raw[lvl].double().numpy() for lvl in (0, 1, 2)], steps)
        got = np.concatenate(packed[i].blocks, axis=-1)
        np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-4)


def test_packed_prefix_reuse_and_k_cut(embedders, seqs):
    emb = embedders[True]
    full = emb.compute(seqs[:10], stop=2, pooling=Pooling.per_residue)
    prefixes = [it.blocks[0] for it in full]
    rest = emb.compute(seqs[:10], stop=2, start=1, pooling=Pooling.per_residue, prefixes=prefixes)
    assert_same_blocks(rest, [type(it)(it.blocks[1:], it.residues, it.handling) for it in full])
    cut = emb.compute(seqs[:10], stop=1, pooling=Pooling.per_residue, k=40)  # dims 32, 48, 64
    for c, f in zip(cut, full, strict=True):
        assert [b.shape[1] for b in c.blocks] == [32, 8]
        np.testing.assert_allclose(c.blocks[1], f.blocks[1][:, :8], atol=1e-6)
    with pytest.raises(ValueError, match="k=50 does not end in level 1"):
        emb.compute(seqs[:2], stop=1, k=50)


def test_pipelined_launches_give_the_same_results_and_stats(embedders, seqs):
    """pipeline_depth 1 (CUDA's: the next batch is launched before this one is copied out)
    run on CPU: same results, same forward statistics, failed batches still split."""
    emb, seqs = embedders[True], seqs[:10]
    plain_stats: list[ForwardStats] = []
    plain = emb.compute(seqs, 2, pooling=Pooling.per_residue, observer=plain_stats.append)
    emb.pipeline_depth = 1
    try:
        stats: list[ForwardStats] = []
        got = emb.compute(seqs, 2, pooling=Pooling.per_residue, observer=stats.append)
        inner, calls = emb.family.forward, []

        def forward(level, batch):  # an allocation failure for rows of > 3 sequences
            calls.append(len(batch.bos_index))
            if len(batch.bos_index) > 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return inner(level, batch)

        emb.family.forward = forward
        split = emb.compute(seqs, 2, pooling=Pooling.mean)
    finally:
        emb.pipeline_depth = 0
        del emb.family.forward
    assert_same_blocks(got, plain, atol=0)
    assert [(s.level, s.rows, s.residues) for s in stats] == [
        (s.level, s.rows, s.residues) for s in plain_stats
    ]
    assert sum(s.residues for s in stats if s.level == 0) == sum(len(s) for s in seqs)
    # Packed, not compiled: a batch holds exactly its tokens (residues + <cls>/<eos>).
    assert all(s.padded_tokens == s.residues + 2 * s.rows for s in stats)
    assert max(calls) > 3 and calls.count(3) > 0
    assert_same_blocks(split, embedders[False].compute(seqs, 2, pooling=Pooling.mean))


def test_packed_plans_fill_the_budget_and_buckets_are_few(fit_sequences):
    tokens = [len(s) + 2 for s in fit_sequences]
    budget = 1536
    batches = plan_packed(tokens, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(tokens)))
    used = [sum(tokens[i] for i in b) for b in batches]
    assert all(u <= budget for u in used)
    assert len(batches) == -(-sum(tokens) // budget)  # first-fit decreasing: no batch to spare
    buckets = token_buckets(budget)
    assert buckets == [192, 384, 768, 1536]
    assert all(bucket_tokens(u, budget) in buckets for u in used)
    assert bucket_tokens(budget + 1, budget) == 2 * budget  # one long (chunked) item alone
    # Padding of the token grid, specials counted as padding (as the worker's histogram does).
    residues = sum(tokens) - 2 * len(tokens)
    padded = plan_batches([t - 2 for t in tokens], budget, overhead=2)
    grid = sum(len(b) * max(tokens[i] for i in b) for b in padded)
    packed_grid = sum(bucket_tokens(u, budget) for u in used)
    pads = (1 - residues / grid, 1 - residues / packed_grid)
    print("padding: padded {:.4f}, packed and bucketed {:.4f}".format(*pads))
    assert packed_grid < grid


# ---- compiled levels -----------------------------------------------------------------------


def compiled_embedder(tiny_artifact, options: CompileOptions, budget: int = 600) -> Embedder:
    art = load_artifact(tiny_artifact)
    family = build_chain("esm2", levels=list(art.levels), device="cpu")
    family.set_fast_path(compile=options)
    return Embedder(family, art, token_budget=budget)


@pytest.fixture
def isolated_compile_env(monkeypatch):
    """Compiling points torch's cache variables at the configured dir: restore them after."""
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(var, "unset")
        monkeypatch.delenv(var)


def test_warm_compiles_every_bucket_and_mixed_traffic_never_recompiles(
    tiny_artifact, embedders, isolated_compile_env
):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    emb = compiled_embedder(tiny_artifact, CompileOptions(backend="eager"), budget=256)
    assert emb.family.packed
    for level in (0, 1):  # levels 0 and 1 (32 and 48 wide): two sets of graphs
        emb.warm(level)
    warm_frames = counters["frames"]["ok"]
    # One graph per (level, bucket): the layers of a level share theirs.
    sizes = warm_buckets(256, emb.family)
    assert sizes == [64, 128, 256, 1024]  # the budget's buckets, and one 1,022-residue row
    assert counters["stats"]["unique_graphs"] == 2 * len(sizes)
    rng = random.Random(3)
    for _ in range(6):
        batch = [random_protein(rng, 5, 250) for _ in range(rng.randint(1, 6))]
        stop = rng.randint(0, 1)
        got = emb.compute(batch, stop, pooling=Pooling.per_residue)
        assert_same_blocks(got, embedders[True].compute(batch, stop, pooling=Pooling.per_residue))
    assert counters["frames"]["ok"] == warm_frames  # steady state: no recompilation


def test_inductor_compiled_level_equals_eager_and_persists_its_cache(
    tiny_artifact, embedders, request, tmp_path, isolated_compile_env
):
    # Kept across runs (pytest's cache), as the model-cache volume keeps it across restarts.
    pytest_cache = getattr(request.config, "cache", None)
    cache = pytest_cache.mkdir("rdserve-compile") if pytest_cache else tmp_path
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    lookups = counters["inductor"]["fxgraph_cache_hit"] + counters["inductor"]["fxgraph_cache_miss"]
    emb = compiled_embedder(tiny_artifact, CompileOptions(cache_dir=cache), budget=256)
    short = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MSDNE", "MKVLAAGIVALLLAAGCSS"]
    got = emb.compute(short, 0, pooling=Pooling.per_residue)  # one level, one bucket: 1 graph
    assert_same_blocks(got, embedders[True].compute(short, 0, pooling=Pooling.per_residue))
    # The compiled graph went through inductor's FX graph cache, kept in the configured dir.
    assert (
        counters["inductor"]["fxgraph_cache_hit"] + counters["inductor"]["fxgraph_cache_miss"]
        > lookups
    )
    assert any((cache / "inductor" / "fxgraph").iterdir())


def test_settings_wire_packing_and_compilation(tiny_artifact, tmp_path, isolated_compile_env):
    from app.bootstrap import make_embedder
    from app.settings import Settings

    art = load_artifact(tiny_artifact)
    base = {"artifact": tiny_artifact, "device": "cpu", "cache_dir": tmp_path / "models"}
    plain = make_embedder(Settings(**base), art).family
    assert not plain.packed and plain.compile_options is None
    packed = make_embedder(Settings(**base, packed_batches=True), art).family
    assert packed.packed and packed.compile_options is None
    compiled = make_embedder(Settings(**base, compile=True), art).family
    assert compiled.packed and compiled.compile_options is not None
    # By default the compile caches live in the model cache (a volume in docker-compose).
    assert compiled.compile_options.cache_dir == tmp_path / "models" / "torch-compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "models/torch-compile/inductor")
    chosen = make_embedder(Settings(**base, compile=True, compile_cache_dir=tmp_path / "cc"), art)
    assert chosen.family.compile_options.cache_dir == tmp_path / "cc"
    assert not any(f.is_loaded(0) for f in (plain, packed, compiled))  # nothing compiled yet
