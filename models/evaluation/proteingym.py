"""ProteinGym DMS assays: loading, subsampling, folds, cached pooled embeddings, probe runs.

One pass of the chain per assay: every level runs once per batch (mean pooling) and the RD
embedding is the projection of the pooled raw outputs (exact: every RD step is affine).  The raw
pooled outputs are cached per assay, so another artifact of the same chain needs no forwards.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from models.evaluation.probe import ALPHAS, probe_score, random_folds
from models.extract import Extractor, ForwardObserver, Pooling
from models.projection import Projector
from models.sequences import LongSequencePolicy, SequenceError, clean_sequences, sequences_digest

REQUIRED_COLUMNS = ("mutant", "mutated_sequence", "DMS_score")
FOLD_COLUMN = "fold_random_5"
CACHE_FORMAT = "rdserve.eval-pooled/1"


@dataclass(frozen=True)
class Assay:
    """The variants of one DMS assay (possibly a subsample of the file's rows)."""

    name: str  # file stem, e.g. BLAT_ECOLX_Stiffler_2015
    path: Path
    mutants: list[str]
    sequences: list[str]  # mutated sequences, all of the wild type's length
    scores: np.ndarray  # (n,) DMS_score, higher = fitter
    file_folds: np.ndarray | None  # (n,) fold_random_5 labels when the file has them
    n_total: int  # usable variants in the file before subsampling

    @property
    def length(self) -> int:
        """Wild-type length (substitutions keep it)."""
        return len(self.sequences[0])

    def __len__(self) -> int:
        return len(self.sequences)


def find_assays(paths: Sequence[Path]) -> list[Path]:
    """CSV files named directly or found (non-recursively, sorted) in named directories."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found.extend(sorted(q for q in p.glob("*.csv") if q.is_file()))
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such assay file or directory")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ValueError(f"no assay CSV files in {', '.join(str(p) for p in paths)}")
    stems = [p.stem for p in unique]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"assay names must be unique; repeated: {', '.join(dup)}")
    return unique


def read_assay(path: Path) -> Assay:
    """Rows of a ProteinGym CSV (mutant, mutated_sequence, DMS_score[, fold_random_5]).

    Rows whose DMS_score is missing or not finite are dropped (they cannot be ranked).
    """
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in cols]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = [r for r in reader if _finite(r["DMS_score"])]
    if len(rows) < 2 * 5:
        raise ValueError(f"{path}: {len(rows)} scored variants; a 5-fold probe needs ≥ 10")
    try:
        seqs = clean_sequences(r["mutated_sequence"] for r in rows)
    except SequenceError as e:
        raise ValueError(f"{path}: row {e.index + 1} ({rows[e.index]['mutant']}): {e}") from None
    if len({len(s) for s in seqs}) != 1:
        raise ValueError(f"{path}: mutated sequences differ in length (substitutions only)")
    folds = None
    if FOLD_COLUMN in cols:
        folds = np.array([int(float(r[FOLD_COLUMN])) for r in rows], dtype=np.int64)
    return Assay(
        name=path.stem,
        path=path,
        mutants=[r["mutant"] for r in rows],
        sequences=seqs,
        scores=np.array([float(r["DMS_score"]) for r in rows]),
        file_folds=folds,
        n_total=len(rows),
    )


def _finite(v: str | None) -> bool:
    try:
        return v is not None and bool(np.isfinite(float(v)))
    except ValueError:
        return False


def subsample_indices(n: int, max_variants: int | None, seed: int) -> np.ndarray:
    """Rows kept: all when n ≤ max_variants, else a seeded uniform draw without replacement,
    in file order (default_rng(seed).choice(n, max_variants, replace=False), sorted)."""
    if max_variants is None or n <= max_variants:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_variants, replace=False))


def subsample(assay: Assay, max_variants: int | None, seed: int) -> Assay:
    """The assay restricted to ``subsample_indices`` (same seed for every assay)."""
    idx = subsample_indices(len(assay), max_variants, seed)
    if len(idx) == len(assay):
        return assay
    return replace(
        assay,
        mutants=[assay.mutants[i] for i in idx],
        sequences=[assay.sequences[i] for i in idx],
        scores=assay.scores[idx],
        file_folds=None if assay.file_folds is None else assay.file_folds[idx],
    )


def assay_folds(assay: Assay, seed: int) -> tuple[np.ndarray, str]:
    """(fold labels, source): the file's fold_random_5 when present, else seeded random 5-fold."""
    if assay.file_folds is not None:
        return assay.file_folds, FOLD_COLUMN
    return random_folds(len(assay), seed), f"random(seed={seed})"


# -- pooled embeddings -------------------------------------------------------------------------


def rd_from_raw(projector: Projector, raw: Sequence[np.ndarray]) -> np.ndarray:
    """h_n = [x_1, a_2, …, a_n] from pooled raw outputs x_ℓ (one affine map per step)."""
    dev = projector.device
    tensors = {i: torch.from_numpy(np.ascontiguousarray(x)).to(dev) for i, x in enumerate(raw)}
    blocks = projector.extend(None, tensors, 0, len(raw) - 1)
    return torch.cat(blocks, dim=1).cpu().numpy()


def local_weights_stamp(model_id: str) -> list[list[str | int]] | None:
    """(file, size, mtime) of a model given as a local path, so that weights rewritten in place
    invalidate cached embeddings; None for hub ids (their revision is in the key already)."""
    path = Path(model_id)
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(f.relative_to(path) if path.is_dir() else f.name), *_stat(f)] for f in files]


def _stat(f: Path) -> tuple[int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns


class PooledChain:
    """Mean-pooled raw outputs of every level of a chain, cached on disk per assay."""

    def __init__(
        self,
        extractor: Extractor,
        cache_dir: Path | None = None,
        policy: LongSequencePolicy = LongSequencePolicy.chunk,
    ) -> None:
        self.extractor = extractor
        self.family = extractor.family
        self.cache_dir = cache_dir
        self.policy = policy

    def cache_key(self, seqs: Sequence[str]) -> str:
        """sha256 of what determines the pooled outputs: model ids, dtype, policy, sequences.

        The sequences (in subsample order) identify the variant subsample; the artifact is not
        part of the key, so any artifact fitted on the same chain reuses the entry.
        """
        spec = {
            "format": CACHE_FORMAT,
            "family": self.family.name,
            "levels": [[lv.model_id, lv.revision, lv.dim] for lv in self.family.levels],
            "local_weights": [local_weights_stamp(lv.model_id) for lv in self.family.levels],
            "dtype": str(self.family.dtype),
            "pooling": str(Pooling.mean),
            "policy": str(self.policy),
            "chunk_overlap": self.extractor.chunk_overlap if self.family.max_residues else None,
            "n": len(seqs),
            "sequences_sha256": sequences_digest(seqs),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def cache_path(self, name: str, seqs: Sequence[str]) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{name}.{self.cache_key(seqs)[:16]}.npz"

    def load_cached(self, name: str, seqs: Sequence[str]) -> tuple[list[np.ndarray], float] | None:
        """(per-level pooled outputs, seconds their forwards took; NaN if unrecorded), or None
        when the entry is absent, stale or unreadable."""
        path = self.cache_path(name, seqs)
        if path is None or not path.is_file():
            return None
        dims = [lv.dim for lv in self.family.levels]
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != self.cache_key(seqs):
                    return None
                raw = [np.asarray(z[f"level{i}"], dtype=np.float32) for i in range(len(dims))]
                seconds = float(z["seconds"]) if "seconds" in z.files else float("nan")
        except (OSError, KeyError, ValueError):
            return None
        if any(x.shape != (len(seqs), d) for x, d in zip(raw, dims, strict=True)):
            return None
        return raw, seconds

    def save_cached(
        self, name: str, seqs: Sequence[str], raw: Sequence[np.ndarray], seconds: float
    ) -> None:
        """Write atomically (temp file + rename) so an interrupted run leaves no torn entry.

        ``seconds`` (the forwards' wall time) is kept so reports of later, cached runs can
        still state what the embeddings cost.
        """
        path = self.cache_path(name, seqs)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"level{i}": x for i, x in enumerate(raw)}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, key=np.array(self.cache_key(seqs)), seconds=np.array(seconds), **arrays)
        os.replace(tmp, path)

    def n_batches(self, seqs: Sequence[str]) -> int:
        return len(self.extractor.plan(seqs, self.policy)[0])

    def compute(
        self,
        seqs: Sequence[str],
        on_batch: Callable[[int, int], None] | None = None,
        observer: ForwardObserver | None = None,
    ) -> list[np.ndarray]:
        """x̄_ℓ for every level ℓ, rows in input order: each batch runs every level once."""
        plans, _ = self.extractor.plan(seqs, self.policy)
        levels = list(range(len(self.family.levels)))
        out = [np.empty((len(seqs), lv.dim), dtype=np.float32) for lv in self.family.levels]
        for plan in plans:
            batch = self.extractor.run(plan, levels, Pooling.mean, observer)
            for i in levels:
                out[i][plan.items] = batch.levels[i].float().cpu().numpy()
            if on_batch is not None:
                on_batch(len(plan.items), int(batch.lengths.sum()))
        return out


# -- configurations and the per-assay probe ----------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One embedding to probe: a level's raw output, RD cut to a level dim, or RD cut to k."""

    name: str  # raw-256 | rd-256 | trunc-128
    kind: str  # raw | rd | trunc
    dim: int
    level: int | None = None  # raw and rd: the level whose dim this is


def truncation_dims(dims: Sequence[int]) -> list[int]:
    """k ∈ {1, 2, 4, …, ≤ d_n} ∪ {d_1, …, d_n}, ascending."""
    top = dims[-1]
    powers = [1 << p for p in range(top.bit_length()) if 1 << p <= top]
    return sorted(set(powers) | set(dims))


def configurations(dims: Sequence[int]) -> list[Config]:
    """raw-d_ℓ and rd-d_ℓ for every level ℓ, then the truncation curve trunc-k of h_n."""
    out = [Config(f"raw-{d}", "raw", d, i) for i, d in enumerate(dims)]
    out += [Config(f"rd-{d}", "rd", d, i) for i, d in enumerate(dims)]
    out += [Config(f"trunc-{k}", "trunc", k) for k in truncation_dims(dims)]
    return out


def features(config: Config, raw: Sequence[np.ndarray], rd: np.ndarray) -> np.ndarray:
    """raw → x̄_ℓ; rd and trunc → the first ``dim`` columns of h̄_n (nested)."""
    if config.kind == "raw":
        assert config.level is not None
        return raw[config.level]
    return rd[:, : config.dim]


def score_configs(
    configs: Sequence[Config],
    raw: Sequence[np.ndarray],
    rd: np.ndarray,
    scores: np.ndarray,
    folds: np.ndarray,
    alphas: np.ndarray = ALPHAS,
) -> dict[str, float]:
    """Probe score of each configuration; identical feature sets (rd-d_ℓ, trunc-d_ℓ) run once."""
    done: dict[tuple[str, int], float] = {}
    out: dict[str, float] = {}
    for c in configs:
        # raw keys by level, rd/trunc by dim: trunc-d_ℓ reuses rd-d_ℓ's probe.
        key = ("raw", c.dim) if c.kind == "raw" else ("rd", c.dim)
        if key not in done:
            done[key] = probe_score(features(c, raw, rd), scores, folds, alphas)
        out[c.name] = done[key]
    return out


# -- a whole evaluation ------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    max_len: int = 600  # skip assays whose wild type is longer
    max_variants: int | None = None  # seeded subsample per assay
    seed: int = 0  # subsample and random-fold seed (same for every assay)


@dataclass
class AssayResult:
    name: str
    length: int  # wild-type length
    n_variants: int  # variants probed (after subsampling)
    n_total: int  # scored variants in the file
    fold_source: str  # fold_random_5 | random(seed=…)
    cached: bool  # pooled embeddings came from the cache
    forward_seconds: float  # wall time of the chain's forwards (this run, or when cached)
    embed_seconds: float  # this run: forwards or cache read, plus the RD projection
    probe_seconds: float  # this run: every configuration's probe
    scores: dict[str, float]  # config name → mean held-out Spearman


@dataclass
class Evaluation:
    dims: list[int]
    configs: list[Config]
    settings: EvalSettings
    results: list[AssayResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (assay, reason)

    def matrix(self, name: str) -> np.ndarray:
        """(assays,) scores of one configuration, in result order."""
        return np.array([r.scores[name] for r in self.results])


@dataclass
class Hooks:
    """Progress callbacks (the CLI draws bars with them)."""

    assay_start: Callable[[str, int], None] | None = None  # (name, batches to run; 0 = cached)
    batch: Callable[[int, int], None] | None = None  # (sequences, residues) of a finished batch
    assay_done: Callable[[AssayResult], None] | None = None
    skipped: Callable[[str, str], None] | None = None


def run_proteingym(
    paths: Sequence[Path],
    chain: PooledChain,
    projector: Projector,
    settings: EvalSettings,
    hooks: Hooks | None = None,
    observer: ForwardObserver | None = None,
) -> Evaluation:
    """Probe every configuration on every assay ≤ max_len (assays in path order)."""
    hooks = hooks or Hooks()
    dims = projector.dims
    ev = Evaluation(list(dims), configurations(dims), settings)
    for path in paths:
        full = read_assay(path)
        if full.length > settings.max_len:
            reason = f"wild type {full.length} aa > max-len {settings.max_len}"
            ev.skipped.append((full.name, reason))
            if hooks.skipped:
                hooks.skipped(full.name, reason)
            continue
        assay = subsample(full, settings.max_variants, settings.seed)
        folds, fold_source = assay_folds(assay, settings.seed)
        t0 = time.perf_counter()
        entry = chain.load_cached(assay.name, assay.sequences)
        cached = entry is not None
        if hooks.assay_start:
            hooks.assay_start(assay.name, 0 if cached else chain.n_batches(assay.sequences))
        if entry is None:
            raw = chain.compute(assay.sequences, hooks.batch, observer)
            forward_s = time.perf_counter() - t0
            chain.save_cached(assay.name, assay.sequences, raw, forward_s)
        else:
            raw, forward_s = entry
        rd = rd_from_raw(projector, raw)
        t1 = time.perf_counter()
        scores = score_configs(ev.configs, raw, rd, assay.scores, folds)
        result = AssayResult(
            name=assay.name,
            length=assay.length,
            n_variants=len(assay),
            n_total=assay.n_total,
            fold_source=fold_source,
            cached=cached,
            forward_seconds=forward_s,
            embed_seconds=t1 - t0,
            probe_seconds=time.perf_counter() - t1,
            scores=scores,
        )
        ev.results.append(result)
        if hooks.assay_done:
            hooks.assay_done(result)
    return ev
