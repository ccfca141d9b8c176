"""Reading sequences from FASTA files for the offline commands, with errors naming records."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from models.sequences import (
    Handling,
    LongSequencePolicy,
    SequenceError,
    clean_sequences,
    plan_segments,
    read_fasta,
)


def naming_record(e: SequenceError, ids: Sequence[str]) -> SequenceError:
    """The same error with the FASTA record's id in front of the reason."""
    return SequenceError(e.index, f"({ids[e.index]}) {e.reason}", e.position, e.char)


def long_sequence_report(
    ids: list[str], seqs: list[str], max_residues: int | None, policy: LongSequencePolicy
) -> str | None:
    """Check sequences against the model context before any work: under ``error`` raise naming
    the FASTA record; otherwise say which records will be truncated or chunked (None if none)."""
    try:
        _, handling = plan_segments(seqs, max_residues, policy, 0)
    except SequenceError as e:
        raise naming_record(e, ids) from None
    changed = [(i, h) for i, h in enumerate(handling) if h != Handling.full]
    if not changed:
        return None
    names = ", ".join(ids[i] for i, _ in changed[:5]) + (", …" if len(changed) > 5 else "")
    return (
        f"{len(changed)} sequence(s) longer than {max_residues} residues were "
        f"{changed[0][1]} (--long-sequence-policy {policy}): {names}"
    )


def read_sequences(fasta: Path, max_seqs: int | None = None) -> tuple[list[str], list[str]]:
    """(ids, validated sequences) of a FASTA file, in file order."""
    records = read_fasta(fasta, max_seqs)
    if not records:
        raise ValueError(f"{fasta}: no sequences")
    ids = [r[0] for r in records]
    try:
        seqs = clean_sequences(r[1] for r in records)
    except SequenceError as e:
        raise naming_record(e, ids) from None
    return ids, seqs
