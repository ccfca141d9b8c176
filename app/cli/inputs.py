"""Reading sequences from FASTA files for the offline commands, with errors naming records by
their 1-based number and id, and an opt-in policy for invalid records and stop codons."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from models.sequences import (
    Handling,
    LongSequencePolicy,
    SequenceError,
    clean_sequence,
    plan_segments,
    read_fasta,
)


class OnInvalid(StrEnum):
    """What to do with a FASTA record whose residues are invalid (or that is empty)."""

    error = "error"  # stop before any work, naming the record
    skip = "skip"  # leave it out; the report lists it


@dataclass
class Records:
    """Validated records of a FASTA source, in file order, and those skipped."""

    ids: list[str]
    seqs: list[str]
    #: (1-based record number, id, reason) of each record left out under --on-invalid skip.
    skipped: list[tuple[int, str, str]] = field(default_factory=list)


def record_error(source: str | Path, number: int, name: str, reason: str) -> ValueError:
    """'<source>: record 3 (id): reason' — records counted from 1, as a person counts them."""
    return ValueError(f"{source}: record {number} ({name}): {reason}")


def long_sequence_report(
    ids: list[str], seqs: list[str], max_residues: int | None, policy: LongSequencePolicy
) -> str | None:
    """Check sequences against the model context before any work: under ``error`` raise naming
    the FASTA record; otherwise say which records will be truncated or chunked (None if none)."""
    try:
        _, handling = plan_segments(seqs, max_residues, policy, 0)
    except SequenceError as e:
        raise ValueError(f"record {e.index + 1} ({ids[e.index]}): {e.reason}") from None
    changed = [(i, h) for i, h in enumerate(handling) if h != Handling.full]
    if not changed:
        return None
    names = ", ".join(ids[i] for i, _ in changed[:5]) + (", …" if len(changed) > 5 else "")
    return (
        f"{len(changed)} sequence(s) longer than {max_residues} residues were "
        f"{changed[0][1]} (--long-sequence-policy {policy}): {names}"
    )


def read_sequences(
    fasta: str | Path,
    max_seqs: int | None = None,
    on_invalid: OnInvalid = OnInvalid.error,
    strip_stop: bool = False,
) -> Records:
    """Validated records of a FASTA file (gzip or "-" for stdin too), in file order.

    ``strip_stop`` removes one trailing '*' (a translated stop codon, as Biopython writes it);
    without it the '*' is an invalid residue whose message suggests --strip-stop.
    """
    records = read_fasta(fasta, max_seqs)
    if not records:
        raise ValueError(f"{fasta}: no sequences")
    out = Records([], [])
    for number, (name, raw) in enumerate(records, start=1):
        if strip_stop and raw.endswith("*"):
            raw = raw[:-1]
        try:
            seq = clean_sequence(raw, number - 1)
        except SequenceError as e:
            reason = e.reason
            if e.char == "*" and e.position == len("".join(raw.split())):
                reason += " (a trailing stop codon: use --strip-stop)"
            if on_invalid == OnInvalid.error:
                hint = "; --on-invalid skip leaves such records out"
                raise record_error(fasta, number, name, reason + hint) from None
            out.skipped.append((number, name, reason))
            continue
        out.ids.append(name)
        out.seqs.append(seq)
    if not out.seqs:
        raise ValueError(f"{fasta}: every record was invalid (see --on-invalid)")
    return out


def skipped_report(skipped: Sequence[tuple[int, str, str]], path: Path) -> str:
    """Write the skipped records as TSV (record, id, reason); a one-line summary to print."""
    lines = ["record\tid\treason", *(f"{n}\t{name}\t{why}" for n, name, why in skipped)]
    path.write_text("\n".join(lines) + "\n")
    first = ", ".join(f"record {n} ({name})" for n, name, _ in skipped[:3])
    more = ", …" if len(skipped) > 3 else ""
    return f"skipped {len(skipped)} invalid record(s): {first}{more}; all listed in {path}"
