"""Protein sequences: validation, FASTA reading, long-sequence windows."""

from __future__ import annotations

import gzip
import hashlib
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TextIO

#: The 20 standard amino acids plus the ambiguity/rare codes every supported family tokenises.
ALPHABET = "ACDEFGHIKLMNPQRSTVWY" + "XBZUO"
_INVALID = re.compile(f"[^{ALPHABET}]")
_WHITESPACE = re.compile(r"\s+")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


class SequenceError(ValueError):
    """An invalid input sequence; names the item index, 1-based position and character."""

    def __init__(
        self, index: int, reason: str, position: int | None = None, char: str | None = None
    ) -> None:
        self.index, self.reason, self.position, self.char = index, reason, position, char
        super().__init__(f"sequence {index}: {reason}")


class LongSequencePolicy(StrEnum):
    """What to do with a sequence longer than the family's context."""

    error = "error"  # reject it
    truncate = "truncate"  # keep the first max_residues residues
    chunk = "chunk"  # overlapping windows, per-residue outputs averaged where they overlap


class Pooling(StrEnum):
    """How per-residue representations become the returned embedding."""

    mean = "mean"  # mean over residues (special tokens and padding excluded)
    per_residue = "per_residue"  # one vector per residue
    bos = "bos"  # the start-token representation

    @classmethod
    def _missing_(cls, value: object) -> Pooling | None:
        """One spelling, per_residue; the CLI-style 'per-residue' (any case) is accepted too."""
        if isinstance(value, str):
            return cls._value2member_map_.get(value.lower().replace("-", "_"))  # type: ignore[return-value]
        return None


class Handling(StrEnum):
    """How a sequence was fed to the model."""

    full = "full"
    truncated = "truncated"
    chunked = "chunked"


def first_duplicate(names: Sequence[str]) -> tuple[int, int] | None:
    """(index of the first repeated name, index of its first occurrence), or None if unique."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            return i, seen[name]
        seen[name] = i
    return None


def clean_sequence(raw: str, index: int) -> str:
    """Strip whitespace, fold case and check the alphabet; raise SequenceError naming the fault."""
    if not isinstance(raw, str):
        raise SequenceError(index, f"expected a string, got {type(raw).__name__}")
    seq = _WHITESPACE.sub("", raw)
    if not seq:
        raise SequenceError(index, "empty sequence")
    # Only ASCII is case-folded: str.upper() maps other letters onto residues ('ß' → 'SS').
    bad = _NON_ASCII.search(seq)
    if bad is None:
        seq = seq.upper()
        bad = _INVALID.search(seq)
    if bad is not None:
        # Report the position in the cleaned sequence: that is what the residue numbering means.
        pos, char = bad.start() + 1, bad.group()
        raise SequenceError(
            index,
            f"invalid residue {char!r} at position {pos}; allowed: {ALPHABET}",
            position=pos,
            char=char,
        )
    return seq


def clean_sequences(raw: Iterable[str]) -> list[str]:
    """Validate a batch; the first fault raises, naming its index."""
    return [clean_sequence(s, i) for i, s in enumerate(raw)]


def sequences_digest(seqs: Iterable[str]) -> str:
    """sha256 over the sequences in order (newline-joined); identifies fitting data."""
    h = hashlib.sha256()
    for s in seqs:
        h.update(s.encode())
        h.update(b"\n")
    return h.hexdigest()


@contextmanager
def open_text(path: str | Path) -> Iterator[TextIO]:
    """A FASTA source as text: a file, a gzip file (by its magic bytes), or "-" for stdin."""
    if str(path) == "-":
        yield sys.stdin
        return
    with open(path, "rb") as probe:
        gz = probe.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rt") if gz else open(path) as fh:
        yield fh


class FastaParser:
    """FASTA records from text fed a line at a time (a file, or an upload as it streams in):
    ``line`` returns the record a header line ends, ``end`` the last one. A record is (id,
    sequence); the id is the header up to the first whitespace."""

    def __init__(self, source: str | Path = "FASTA") -> None:
        self.source = source  # named in errors
        self._name: str | None = None
        self._parts: list[str] = []

    def line(self, line: str) -> tuple[str, str] | None:
        line = line.strip()
        if line.startswith(">"):
            done = self.end()
            self._name, self._parts = (line[1:].split() or [""])[0], []
            return done
        if line:
            if self._name is None:
                raise ValueError(f"{self.source}: sequence data before the first '>' header")
            self._parts.append(line)
        return None

    def end(self) -> tuple[str, str] | None:
        """The record in progress (None before the first header)."""
        if self._name is None:
            return None
        rec, self._name, self._parts = (self._name, "".join(self._parts)), None, []
        return rec


def iter_fasta(path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield (id, sequence) records; the id is the header up to the first whitespace.

    ``path`` may be gzip-compressed, or "-" for standard input.
    """
    parser = FastaParser(path)
    with open_text(path) as fh:
        for line in fh:
            if (rec := parser.line(line)) is not None:
                yield rec
    if (rec := parser.end()) is not None:
        yield rec


def packaged_sample() -> Path:
    """The 1,000 UniRef90 sequences shipped in the package (see models/data/README.md)."""
    return Path(__file__).resolve().parent / "data" / "uniref90_sample_1k.fasta"


def read_fasta(path: str | Path, max_records: int | None = None) -> list[tuple[str, str]]:
    """Read up to max_records records of a FASTA file (in file order)."""
    out: list[tuple[str, str]] = []
    for rec in iter_fasta(path):
        if max_records is not None and len(out) >= max_records:
            break
        out.append(rec)
    return out


@dataclass(frozen=True, slots=True)
class Segment:
    """One window of one input sequence, as fed to the model."""

    item: int  # index of the input sequence
    start: int  # 0-based offset of the window in that sequence
    seq: str  # the residues of the window


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Start offsets of overlapping windows covering [0, length); the last ends at length."""
    if length <= window:
        return [0]
    stride = max(1, window - overlap)
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


def handling_for(
    index: int, length: int, max_residues: int | None, policy: LongSequencePolicy
) -> Handling:
    """How sequence ``index`` of ``length`` residues is fed to a model whose context is
    ``max_residues`` (None: unlimited) under ``policy`` — the one place this is decided.

    Raises SequenceError under ``error`` when the sequence does not fit.
    """
    if max_residues is None or length <= max_residues:
        return Handling.full
    if policy == LongSequencePolicy.error:
        raise SequenceError(
            index,
            f"length {length} exceeds the model context of {max_residues} residues "
            "(use long_sequence_policy 'truncate' or 'chunk')",
        )
    return Handling.truncated if policy == LongSequencePolicy.truncate else Handling.chunked


def plan_segments(
    seqs: Sequence[str],
    max_residues: int | None,
    policy: LongSequencePolicy,
    overlap: int,
) -> tuple[list[Segment], list[Handling]]:
    """Split sequences into model-sized segments according to the long-sequence policy."""
    segments: list[Segment] = []
    handling: list[Handling] = []
    for i, s in enumerate(seqs):
        how = handling_for(i, len(s), max_residues, policy)
        handling.append(how)
        if how == Handling.full:
            segments.append(Segment(i, 0, s))
        elif how == Handling.truncated:
            assert max_residues is not None
            segments.append(Segment(i, 0, s[:max_residues]))
        else:
            assert max_residues is not None
            for start in window_starts(len(s), max_residues, overlap):
                segments.append(Segment(i, start, s[start : start + max_residues]))
    return segments, handling
