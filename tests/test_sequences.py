"""Sequence validation, FASTA reading and long-sequence windows."""

from __future__ import annotations

import itertools

import pytest

from models.sequences import (
    ALPHABET,
    Handling,
    LongSequencePolicy,
    SequenceError,
    clean_sequence,
    clean_sequences,
    plan_segments,
    read_fasta,
    window_starts,
)


def test_clean_strips_whitespace_and_folds_case():
    assert clean_sequence("  mkv\tl\nQ  ", 0) == "MKVLQ"


def test_every_allowed_letter_passes():
    assert clean_sequence(ALPHABET.lower(), 0) == ALPHABET
    assert set("XBZUO") <= set(ALPHABET)


@pytest.mark.parametrize(
    ("raw", "pos", "char"),
    [("MKJV", 3, "J"), ("mk1", 3, "1"), ("M*", 2, "*"), ("M-K", 2, "-"), ("ACDÉ", 4, "É")],
)
def test_invalid_residue_names_index_position_and_character(raw, pos, char):
    with pytest.raises(SequenceError) as ei:
        clean_sequences(["MKV", raw])
    e = ei.value
    assert (e.index, e.position, e.char) == (1, pos, char)
    assert "sequence 1" in str(e) and f"position {pos}" in str(e) and repr(char) in str(e)


@pytest.mark.parametrize("raw", ["", "   ", "\n\t"])
def test_empty_sequence_is_an_error(raw):
    with pytest.raises(SequenceError, match="sequence 2: empty sequence") as ei:
        clean_sequences(["M", "K", raw])
    assert ei.value.index == 2


def test_non_string_is_an_error():
    with pytest.raises(SequenceError, match="expected a string, got int"):
        clean_sequence(5, 0)  # type: ignore[arg-type]


def test_read_fasta(tmp_path):
    p = tmp_path / "x.fasta"
    p.write_text(">a desc\nMKV\nLL\n\n>b\nQQ\n>c\n")
    assert read_fasta(p) == [("a", "MKVLL"), ("b", "QQ"), ("c", "")]
    assert read_fasta(p, 1) == [("a", "MKVLL")]
    (tmp_path / "bad.fasta").write_text("MKV\n>a\nM\n")
    with pytest.raises(ValueError, match="before the first"):
        read_fasta(tmp_path / "bad.fasta")


def test_window_starts_cover_and_end_at_length():
    assert window_starts(10, 10, 3) == [0]
    starts = window_starts(25, 10, 4)
    assert starts[0] == 0 and starts[-1] == 15
    covered = set()
    for s in starts:
        covered.update(range(s, s + 10))
    assert covered == set(range(25))
    assert all(b - a <= 6 for a, b in itertools.pairwise(starts))


def test_plan_segments_policies():
    seqs = ["M" * 5, "K" * 12]
    with pytest.raises(
        SequenceError, match="sequence 1: length 12 exceeds the model context of 10"
    ):
        plan_segments(seqs, 10, LongSequencePolicy.error, 4)
    segs, how = plan_segments(seqs, 10, LongSequencePolicy.truncate, 4)
    assert how == [Handling.full, Handling.truncated]
    assert [len(s.seq) for s in segs] == [5, 10]
    segs, how = plan_segments(seqs, 10, LongSequencePolicy.chunk, 4)
    assert how == [Handling.full, Handling.chunked]
    assert [(s.item, s.start, len(s.seq)) for s in segs] == [(0, 0, 5), (1, 0, 10), (1, 2, 10)]
    segs, how = plan_segments(seqs, None, LongSequencePolicy.error, 4)
    assert how == [Handling.full, Handling.full]


@pytest.mark.parametrize(
    ("raw", "pos", "char"), [("ACß", 3, "ß"), ("MſK", 2, "ſ"), ("acDﬀ", 4, "ﬀ")]
)
def test_non_ascii_letters_are_not_case_folded_into_residues(raw, pos, char):
    """str.upper() would turn 'ß' into 'SS' and 'ſ' into 'S': reject them where they stand."""
    with pytest.raises(SequenceError) as e:
        clean_sequence(raw, 4)
    assert (e.value.index, e.value.position, e.value.char) == (4, pos, char)
