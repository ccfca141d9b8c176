"""RD embeddings end to end: nestedness, pooled projection, partial prefixes."""

from __future__ import annotations

import random

import numpy as np
import pytest

from models.artifact import load_artifact
from models.embedder import Embedder
from models.extract import Extractor, Pooling
from models.families import build_chain
from models.rd import apply_chain
from models.sequences import LongSequencePolicy
from tests.helpers import random_protein


@pytest.fixture(scope="module")
def embedder(tiny_artifact):
    art = load_artifact(tiny_artifact)
    return Embedder(
        build_chain("esm2", levels=list(art.levels), device="cpu"), art, token_budget=600
    )


@pytest.fixture(scope="module")
def seqs():
    rng = random.Random(5)
    return [random_protein(rng, 8, 120) for _ in range(12)]


def raw_levels(embedder, seqs, pooling):
    """Raw per-level outputs per sequence via the extractor (ground truth for projection)."""
    ex = Extractor(embedder.family, 10_000)
    plans, _ = ex.plan(seqs)
    per = {i: {} for i in range(len(seqs))}
    for p in plans:
        out = ex.run(p, [0, 1, 2], pooling)
        cuts = np.cumsum(out.lengths)[:-1]
        for lvl, t in out.levels.items():
            parts = np.split(t.numpy(), cuts) if pooling == Pooling.per_residue else list(t.numpy())
            for i, part in zip(p.items, parts, strict=True):
                per[i][lvl] = part
    return per


def test_rd_matches_the_float64_reference_and_is_nested(embedder, seqs):
    per_res = raw_levels(embedder, seqs, Pooling.per_residue)
    steps = list(embedder.artifact.steps)
    full, _ = embedder.embed(seqs, 64, Pooling.per_residue)
    for k, stop in ((32, 0), (48, 1), (40, 1), (7, 0)):
        part, _ = embedder.embed(seqs, k, Pooling.per_residue)
        for i in range(len(seqs)):
            assert part[i].shape == (len(seqs[i]), k)
            # Nested: the first k dims of the largest embedding are exactly the k-dim one.
            np.testing.assert_array_equal(part[i], full[i][:, :k])
            xs = [per_res[i][lvl] for lvl in range(stop + 1)]
            np.testing.assert_allclose(part[i], apply_chain(xs, steps)[:, :k], atol=1e-4)
    for i in range(len(seqs)):
        np.testing.assert_allclose(full[i][:, :32], per_res[i][0], atol=1e-5)  # level 1 is x_1


def test_pooled_projection_equals_mean_of_per_residue_rd(embedder, seqs):
    per_residue, _ = embedder.embed(seqs, 64, Pooling.per_residue)
    pooled, items = embedder.embed(seqs, 64, Pooling.mean)
    for i in range(len(seqs)):
        assert pooled[i].shape == (64,)
        np.testing.assert_allclose(pooled[i], per_residue[i].mean(axis=0), atol=1e-5)
        assert items[i].residues == len(seqs[i])


def test_normalize_after_truncation(embedder, seqs):
    raw, _ = embedder.embed(seqs, 40, Pooling.mean)
    unit, _ = embedder.embed(seqs, 40, Pooling.mean, normalize=True)
    for r, u in zip(raw, unit, strict=True):
        np.testing.assert_allclose(np.linalg.norm(u), 1.0, rtol=1e-6)
        np.testing.assert_allclose(u, r / np.linalg.norm(r), rtol=1e-5)


@pytest.mark.parametrize("pooling", [Pooling.mean, Pooling.per_residue, Pooling.bos])
def test_partial_prefix_reuse_equals_a_full_computation(embedder, seqs, pooling):
    full = embedder.compute(seqs, stop=2, pooling=pooling)
    prefixes = [np.concatenate(it.blocks[:1], axis=-1) for it in full]
    rest = embedder.compute(seqs, stop=2, start=1, pooling=pooling, prefixes=prefixes)
    for a, b in zip(full, rest, strict=True):
        assert len(b.blocks) == 2
        for x, y in zip(a.blocks[1:], b.blocks, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5)
    calls = []
    embedder.compute(
        seqs[:2],
        stop=2,
        start=2,
        pooling=pooling,
        prefixes=[np.concatenate(it.blocks[:2], axis=-1) for it in full[:2]],
        observer=calls.append,
    )
    assert {c.level for c in calls} == {2}  # only the missing model ran


def test_long_sequences_are_reported(embedder):
    long = "M" + "ACDEFGHIKL" * 110
    _, items = embedder.embed(["MKV", long], 48, Pooling.mean, LongSequencePolicy.truncate)
    assert [it.handling for it in items] == ["full", "truncated"]
    assert items[1].residues == 1022
    _, items = embedder.embed(["MKV", long], 48, Pooling.mean, LongSequencePolicy.chunk)
    assert [it.handling for it in items] == ["full", "chunked"]
    assert items[1].residues == len(long)
