"""ProteinGym DMS linear probes: cached pooled embeddings, configurations, the per-assay runs.

One pass of the chain per assay: every level runs once per batch (mean pooling) and the RD
embedding is the projection of the pooled raw outputs (exact: every RD step is affine).  The raw
pooled outputs are cached per assay, so another artifact of the same chain needs no forwards;
the PCA baselines' fitting moments are cached the same way.  Assay files are read and checked
first (:mod:`models.evaluation.assays`); each assay is probed under every fold scheme asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.artifact import Artifact
from models.evaluation.assays import PreparedAssays, assay_folds
from models.evaluation.baselines import CONCAT, TOP, Baselines
from models.evaluation.folds import ALL_SCHEMES, FoldScheme
from models.evaluation.options import ALPHAS, MeanPooling, Probe
from models.evaluation.probe import probe_score
from models.extract import Extractor, ForwardObserver, Pooling
from models.fit import Progress, accumulate_moments
from models.moments import Moments
from models.projection import Projector
from models.sequences import LongSequencePolicy, sequences_digest

CACHE_FORMAT = "rdserve.eval-pooled/1"
MOMENTS_FORMAT = "rdserve.eval-moments/1"


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

    def moments_key(self, seqs: Sequence[str], policy: LongSequencePolicy) -> str:
        """sha256 of what determines the per-residue joint moments of fitting sequences."""
        spec = {
            "format": MOMENTS_FORMAT,
            "family": self.family.name,
            "levels": [[lv.model_id, lv.revision, lv.dim] for lv in self.family.levels],
            "local_weights": [local_weights_stamp(lv.model_id) for lv in self.family.levels],
            "dtype": str(self.family.dtype),
            "policy": str(policy),
            "token_budget": self.extractor.token_budget,
            "n": len(seqs),
            "sequences_sha256": sequences_digest(seqs),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def fitting_moments(
        self,
        seqs: Sequence[str],
        policy: LongSequencePolicy = LongSequencePolicy.truncate,
        progress: Progress | None = None,
    ) -> tuple[Moments, bool]:
        """(joint per-residue moments of [x_1 … x_n] over ``seqs``, whether from the cache):
        one pass of the chain, as :func:`models.fit.accumulate_moments` runs for a fit."""
        key = self.moments_key(seqs, policy)
        path = None if self.cache_dir is None else self.cache_dir / f"moments.{key[:16]}.npz"
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    if str(z["key"]) == key:
                        m = Moments(int(z["mean"].shape[0]))
                        m.mean, m.scatter, m.n = z["mean"], z["scatter"], int(z["n"])
                        return m, True
            except (OSError, KeyError, ValueError):
                pass
        moments = accumulate_moments(self.extractor, seqs, policy, progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    key=np.array(key),
                    mean=moments.mean,
                    scatter=moments.scatter,
                    n=np.array(moments.n),
                )
            os.replace(tmp, path)
        return moments, False

    def start_states(self) -> list[np.ndarray]:
        """Per level, the state after the start token alone (UniRep: h_0), for
        :attr:`MeanPooling.jax_unirep`."""
        start_state = getattr(self.family, "start_state", None)
        if start_state is None:
            raise ValueError(
                f"--pooling {MeanPooling.jax_unirep} is UniRep's convention; the "
                f"{self.family.name} family has no start state"
            )
        return [start_state(i).cpu().numpy() for i in range(len(self.family.levels))]


def jax_unirep_mean(residue_mean: np.ndarray, length: int, start_state: np.ndarray) -> np.ndarray:
    """(L·x̄ + h_0)/(L + 1): jax-unirep's h_avg from the residues-only mean x̄ of length L.

    h_0 is the same for every sequence (the recurrence starts from zeros), so within one assay
    (one length) this is an affine map with a common scale: RD of it is the same affine map of
    RD (every step is affine), and the standardised probe's scores do not change.
    """
    mean = (length * np.asarray(residue_mean, np.float64) + start_state) / (length + 1)
    return mean.astype(np.float32)


# -- configurations and the per-assay probe ----------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One embedding to probe.

    raw-d: a level's raw output; rd-d: RD cut to a level's dim; trunc-k: RD of the largest level
    cut to k; pca-concat-k / pca-top-k: the baselines (:mod:`models.evaluation.baselines`).
    """

    name: str  # raw-256 | rd-256 | trunc-128 | pca-concat-128 | pca-top-128
    kind: str  # raw | rd | trunc | pca-concat | pca-top
    dim: int
    level: int | None = None  # raw and rd: the level whose dim this is


def truncation_dims(dims: Sequence[int]) -> list[int]:
    """k ∈ {1, 2, 4, …, ≤ d_n} ∪ {d_1, …, d_n}, ascending."""
    top = dims[-1]
    powers = [1 << p for p in range(top.bit_length()) if 1 << p <= top]
    return sorted(set(powers) | set(dims))


def configurations(dims: Sequence[int], baselines: bool = False) -> list[Config]:
    """raw-d_ℓ and rd-d_ℓ for every level ℓ, the truncation curve trunc-k of h_n, and with
    ``baselines`` pca-concat-k and pca-top-k at the same k."""
    out = [Config(f"raw-{d}", "raw", d, i) for i, d in enumerate(dims)]
    out += [Config(f"rd-{d}", "rd", d, i) for i, d in enumerate(dims)]
    ks = truncation_dims(dims)
    out += [Config(f"trunc-{k}", "trunc", k) for k in ks]
    if baselines:
        out += [Config(f"{CONCAT}-{k}", CONCAT, k) for k in ks]
        out += [Config(f"{TOP}-{k}", TOP, k) for k in ks]
    return out


def features(
    config: Config,
    raw: Sequence[np.ndarray],
    rd: np.ndarray,
    pcs: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """The (n, dim) feature matrix of a configuration."""
    if config.kind == "raw" and config.level is not None:
        return raw[config.level]
    if config.kind in (CONCAT, TOP):
        if pcs is None:
            raise ValueError(f"{config.name}: no baselines were fitted")
        return pcs[config.kind][:, : config.dim]
    return rd[:, : config.dim]


def score_configs(
    configs: Sequence[Config],
    raw: Sequence[np.ndarray],
    rd: np.ndarray,
    scores: np.ndarray,
    folds: np.ndarray,
    pcs: dict[str, np.ndarray] | None = None,
    probe: Probe = Probe.standardised,
    alphas: np.ndarray = ALPHAS,
) -> dict[str, float]:
    """Probe score of each configuration; identical feature sets (rd-d_ℓ, trunc-d_ℓ) run once."""
    done: dict[tuple[str, int], float] = {}
    out: dict[str, float] = {}
    d1 = raw[0].shape[1]
    for c in configs:
        # Keyed by the features: trunc-d_ℓ reuses rd-d_ℓ's probe, and RD up to d_1 is raw-d_1.
        kind = c.kind if c.kind in (CONCAT, TOP) else "rd"
        key = ("raw", c.dim) if c.kind == "raw" or (kind == "rd" and c.dim == d1) else (kind, c.dim)
        if key not in done:
            x = features(c, raw, rd, pcs)
            done[key] = probe_score(x, scores, folds, alphas, probe)
        out[c.name] = done[key]
    return out


# -- a whole evaluation ------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    max_len: int = 600  # skip assays whose wild type is longer
    max_variants: int | None = None  # seeded subsample per assay
    seed: int = 0  # subsample and random-fold seed (same for every assay)
    schemes: tuple[FoldScheme, ...] = ALL_SCHEMES
    probe: Probe = Probe.standardised
    pooling: MeanPooling = MeanPooling.residues


@dataclass
class AssayResult:
    name: str
    length: int  # wild-type length
    n_variants: int  # variants probed (after subsampling)
    n_total: int  # scored variants in the file
    fold_sources: dict[FoldScheme, str]  # scheme → "file" or how the folds were built
    cached: bool  # pooled embeddings came from the cache
    forward_seconds: float  # wall time of the chain's forwards (this run, or when cached)
    embed_seconds: float  # this run: forwards or cache read, plus the projections
    probe_seconds: float  # this run: every configuration's probe under every scheme
    scores: dict[FoldScheme, dict[str, float]]  # scheme → config → mean held-out Spearman


@dataclass(frozen=True)
class BaselineFit:
    """Where the PCA baselines came from (for reports)."""

    source: str  # the fitting FASTA
    n_sequences: int
    n_residues: int
    data_sha256: str
    cached: bool
    seconds: float  # this run: the moments (forwards or cache read) and both eigendecompositions


@dataclass
class Evaluation:
    dims: list[int]
    configs: list[Config]
    settings: EvalSettings
    results: list[AssayResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (assay, reason)
    notes: list[str] = field(default_factory=list)  # input files left out, and why
    baselines: BaselineFit | None = None

    @property
    def schemes(self) -> tuple[FoldScheme, ...]:
        return self.settings.schemes

    def matrix(self, name: str, scheme: FoldScheme = FoldScheme.random) -> np.ndarray:
        """(assays,) scores of one configuration under one scheme, in result order."""
        return np.array([r.scores[scheme][name] for r in self.results])

    def config(self, name: str) -> Config:
        return next(c for c in self.configs if c.name == name)


@dataclass
class Hooks:
    """Progress callbacks (the CLI draws bars with them)."""

    assay_start: Callable[[str, int], None] | None = None  # (name, batches to run; 0 = cached)
    batch: Callable[[int, int], None] | None = None  # (sequences, residues) of a finished batch
    assay_done: Callable[[AssayResult], None] | None = None


def run_proteingym(
    prepared: PreparedAssays,
    chain: PooledChain,
    projector: Projector,
    settings: EvalSettings,
    hooks: Hooks | None = None,
    observer: ForwardObserver | None = None,
    baselines: Baselines | None = None,
    baseline_fit: BaselineFit | None = None,
) -> Evaluation:
    """Probe every configuration on every prepared assay under every scheme of ``settings``."""
    hooks = hooks or Hooks()
    dims = projector.dims
    if list(dims) != [lv.dim for lv in chain.family.levels]:
        raise ValueError(f"artifact dims {list(dims)} differ from the chain's")
    ev = Evaluation(
        list(dims),
        configurations(dims, baselines is not None),
        settings,
        skipped=list(prepared.skipped),
        notes=list(prepared.notes),
        baselines=baseline_fit,
    )
    starts = chain.start_states() if settings.pooling == MeanPooling.jax_unirep else None
    for assay in prepared.assays:
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
        if starts is not None:
            raw = [jax_unirep_mean(x, assay.length, h0) for x, h0 in zip(raw, starts, strict=True)]
        rd = rd_from_raw(projector, raw)
        pcs = baselines.project(raw) if baselines is not None else None
        t1 = time.perf_counter()
        scores: dict[FoldScheme, dict[str, float]] = {}
        sources: dict[FoldScheme, str] = {}
        for scheme in settings.schemes:
            folds, sources[scheme] = assay_folds(assay, scheme, settings.seed)
            scores[scheme] = score_configs(
                ev.configs, raw, rd, assay.scores, folds, pcs, settings.probe
            )
        result = AssayResult(
            name=assay.name,
            length=assay.length,
            n_variants=len(assay),
            n_total=assay.n_total,
            fold_sources=sources,
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


# -- the baselines' fitting data ---------------------------------------------------------------


def check_fitting_data(artifact: Artifact, seqs: Sequence[str], source: str) -> None:
    """Raise unless ``seqs`` are the artifact's fitting sequences (its recorded sha256)."""
    want = artifact.fitting.get("data_sha256")
    got = sequences_digest(seqs)
    if want and got != want:
        raise ValueError(
            f"{source}: these {len(seqs):,} sequences are not the artifact's fitting data "
            f"(sha256 {got[:16]}… vs {str(want)[:16]}…; it was fitted on "
            f"{artifact.fitting.get('n_sequences')} sequences of {artifact.fitting.get('source')})"
        )


def fit_baselines(
    chain: PooledChain,
    artifact: Artifact,
    seqs: Sequence[str],
    source: str,
    progress: Progress | None = None,
) -> tuple[Baselines, BaselineFit]:
    """Both PCA baselines from the joint moments of the artifact's own fitting sequences (one
    pass of the chain, cached), up to the largest level's width."""
    check_fitting_data(artifact, seqs, source)
    t0 = time.perf_counter()
    policy = LongSequencePolicy(artifact.fitting.get("long_sequence_policy") or "truncate")
    moments, cached = chain.fitting_moments(seqs, policy, progress)
    dims = [lv.dim for lv in chain.family.levels]
    baselines = Baselines.from_moments(moments, dims, dims[-1])
    fit = BaselineFit(
        source=source,
        n_sequences=len(seqs),
        n_residues=moments.n,
        data_sha256=sequences_digest(seqs),
        cached=cached,
        seconds=time.perf_counter() - t0,
    )
    return baselines, fit
