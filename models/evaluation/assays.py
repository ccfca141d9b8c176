"""ProteinGym DMS assay files: finding, reading, validating, subsampling, folds.

Every input is read and checked before any model runs (:func:`prepare_assays`): a run that
would fail on its last file fails at once, naming the file and row, and CSV files that are not
assays (a ``manifest.csv`` or ``DMS_substitutions.csv`` beside the assays) are skipped with a
note.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from models.evaluation.folds import (
    ALL_SCHEMES,
    N_FOLDS,
    FoldScheme,
    built_source,
    contiguous_folds,
    modulo_folds,
    parse_mutant,
    random_folds,
)
from models.sequences import SequenceError, clean_sequences

REQUIRED_COLUMNS = ("mutant", "mutated_sequence", "DMS_score")
MIN_VARIANTS = 2 * N_FOLDS


@dataclass(frozen=True)
class Assay:
    """The variants of one DMS assay (possibly a subsample of the file's rows)."""

    name: str  # file stem, e.g. BLAT_ECOLX_Stiffler_2015
    path: Path
    wild_type: str
    mutants: list[str]
    sequences: list[str]  # mutated sequences, all of the wild type's length
    scores: np.ndarray  # (n,) DMS_score, higher = fitter
    positions: np.ndarray | None  # (n,) 1-based mutated position; None if any row is multiple
    folds: dict[FoldScheme, np.ndarray]  # (n,) labels per scheme: file columns, built ones
    fold_sources: dict[FoldScheme, str]  # scheme → "file" or how it was built
    n_total: int  # usable variants in the file before subsampling

    @property
    def length(self) -> int:
        """Wild-type length (substitutions keep it)."""
        return len(self.wild_type)

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


def csv_columns(path: Path) -> list[str]:
    """The header row of a CSV file ([] when empty or unreadable as text)."""
    try:
        with open(path, newline="") as fh:
            return next(csv.reader(fh), [])
    except UnicodeDecodeError:
        return []


def is_assay_file(columns: Sequence[str]) -> bool:
    """True when a header has any of the assay columns: such a file must then be a valid assay
    (a file with none of them, e.g. a manifest, is not one)."""
    return any(c in columns for c in REQUIRED_COLUMNS)


def read_assay(path: Path) -> Assay:
    """Rows of a ProteinGym CSV: mutant, mutated_sequence, DMS_score[, fold columns].

    Checked: the columns; residues; one length; every mutant (``H24C``, ``H24C:A25D``) names
    a position inside the sequence holding its mutant residue; one wild type shared by all rows
    (each row with its substitutions reverted); integer fold labels. Rows whose DMS_score is
    missing or not finite are dropped (they cannot be ranked). Errors name the file and row.
    """
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in cols]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = [(i, r) for i, r in enumerate(reader, start=1) if _finite(r["DMS_score"])]
    if len(rows) < MIN_VARIANTS:
        raise ValueError(
            f"{path}: {len(rows)} scored variants; a {N_FOLDS}-fold probe needs ≥ {MIN_VARIANTS}"
        )

    def where(j: int) -> str:
        number, r = rows[j]
        return f"{path}: row {number} ({r['mutant']})"

    try:
        seqs = clean_sequences(r["mutated_sequence"] for _, r in rows)
    except SequenceError as e:
        raise ValueError(f"{where(e.index)}: {e}") from None
    wild_type: str | None = None
    positions: list[int] = []
    multiple = False
    for j, ((_, r), seq) in enumerate(zip(rows, seqs, strict=True)):
        try:
            subs = parse_mutant(r["mutant"])
        except ValueError as e:
            raise ValueError(f"{where(j)}: {e}") from None
        if wild_type is not None and len(seq) != len(wild_type):
            raise ValueError(
                f"{where(j)}: mutated_sequence has {len(seq)} residues, row {rows[0][0]} has "
                f"{len(wild_type)} (substitutions only)"
            )
        reverted = seq
        for wt, pos, mut in subs:
            if pos > len(seq):
                raise ValueError(f"{where(j)}: position {pos} is past the sequence ({len(seq)} aa)")
            if seq[pos - 1] != mut:
                raise ValueError(
                    f"{where(j)}: mutated_sequence has {seq[pos - 1]} at {pos}, not {mut}"
                )
            reverted = reverted[: pos - 1] + wt + reverted[pos:]
        if wild_type is None:
            wild_type = reverted
        elif reverted != wild_type:
            at = next(i for i, (a, b) in enumerate(zip(reverted, wild_type, strict=True)) if a != b)
            raise ValueError(
                f"{where(j)}: wild type differs from row {rows[0][0]}'s at position {at + 1} "
                f"({reverted[at]} vs {wild_type[at]})"
            )
        multiple = multiple or len(subs) > 1
        positions.append(subs[0][1])
    folds: dict[FoldScheme, np.ndarray] = {}
    for scheme in ALL_SCHEMES:
        if scheme.value in cols:
            folds[scheme] = _fold_column(path, rows, scheme.value)
    return Assay(
        name=path.stem,
        path=path,
        wild_type=wild_type or "",
        mutants=[r["mutant"] for _, r in rows],
        sequences=seqs,
        scores=np.array([float(r["DMS_score"]) for _, r in rows]),
        positions=None if multiple else np.array(positions, dtype=np.int64),
        folds=folds,
        fold_sources={s: "file" for s in folds},
        n_total=len(rows),
    )


def _fold_column(path: Path, rows: list[tuple[int, dict[str, str]]], column: str) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.int64)
    for j, (number, r) in enumerate(rows):
        v = r[column]
        try:
            f = float(v)
            if not f.is_integer():
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"{path}: row {number}: {column} {v!r} is not a fold number") from None
        out[j] = int(f)
    return out


def _finite(v: str | None) -> bool:
    try:
        return v is not None and bool(np.isfinite(float(v)))
    except ValueError:
        return False


def with_position_folds(assay: Assay, schemes: Sequence[FoldScheme]) -> Assay:
    """The assay with modulo/contiguous folds built by position (on all of its variants) for
    the schemes asked for that its file lacks."""
    build = [s for s in schemes if s != FoldScheme.random and s not in assay.folds]
    if not build:
        return assay
    if assay.positions is None:
        names = ", ".join(s.value for s in build)
        raise ValueError(
            f"{assay.path}: no {names} column, and folds by position need single substitutions"
        )
    folds, sources = dict(assay.folds), dict(assay.fold_sources)
    for s in build:
        maker = modulo_folds if s == FoldScheme.modulo else contiguous_folds
        try:
            folds[s] = maker(assay.positions)
        except ValueError as e:
            raise ValueError(f"{assay.path}: {s.value}: {e}") from None
        sources[s] = built_source(s, 0)
    return replace(assay, folds=folds, fold_sources=sources)


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
        positions=None if assay.positions is None else assay.positions[idx],
        folds={s: f[idx] for s, f in assay.folds.items()},
    )


def assay_folds(assay: Assay, scheme: FoldScheme, seed: int) -> tuple[np.ndarray, str]:
    """(labels, source) of one scheme: the file's column or folds built by position, else (for
    fold_random_5 only) a seeded random 5-fold of the variants as probed."""
    if scheme in assay.folds:
        return assay.folds[scheme], assay.fold_sources[scheme]
    if scheme == FoldScheme.random:
        return random_folds(len(assay), seed), built_source(scheme, seed)
    raise ValueError(f"{assay.name}: no {scheme.value} folds (see with_position_folds)")


@dataclass
class PreparedAssays:
    """What a run will probe, all checked before any model runs."""

    assays: list[Assay] = field(default_factory=list)  # subsampled, folds ready
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (assay, reason)
    notes: list[str] = field(default_factory=list)  # files that are not assays


def prepare_assays(
    paths: Sequence[Path],
    schemes: Sequence[FoldScheme],
    max_len: int,
    max_variants: int | None,
    seed: int,
) -> PreparedAssays:
    """Read and check every file first; raise one error listing every bad assay file.

    Files without any assay column are noted and left out; assays whose wild type is longer
    than ``max_len`` are skipped with the reason; each kept assay gets its position folds
    (built on all its variants) and is then subsampled.
    """
    out = PreparedAssays()
    errors: list[str] = []
    for path in paths:
        cols = csv_columns(path)
        if not is_assay_file(cols):
            shown = ", ".join(cols[:6]) + (", …" if len(cols) > 6 else "")
            out.notes.append(
                f"{path.name}: not an assay (no {', '.join(REQUIRED_COLUMNS)} column; "
                f"columns: {shown or 'none'}), left out"
            )
            continue
        try:
            full = with_position_folds(read_assay(path), schemes)
        except (ValueError, OSError) as e:
            errors.append(str(e))
            continue
        if full.length > max_len:
            out.skipped.append((full.name, f"wild type {full.length} aa > max-len {max_len}"))
            continue
        out.assays.append(subsample(full, max_variants, seed))
    if errors:
        head = f"{len(errors)} invalid assay file(s), nothing was run:"
        raise ValueError("\n".join([head, *(f"  {e}" for e in errors)]))
    return out
