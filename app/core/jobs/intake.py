"""Intake: a job's records validated as they arrive (a FASTA upload, plain or gzip, streamed;
or the list of a JSON body) and written to the store in chunks, before any model runs.

Nothing holds the whole input: an upload is decompressed and parsed piece by piece, and each
chunk is written once it is full. Limits (records, residues, bytes) answer 413 as soon as they
are crossed; an invalid record answers 400 naming it (record number from 1, and id), or is
left out and listed under the ``skip`` policy.
"""

from __future__ import annotations

import array
import codecs
import hashlib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from app.core.errors import APIError
from app.core.jobs.model import Failure, JobOptions, OnInvalid
from app.core.store import ResultStore
from models.formats import member_name_problem
from models.sequences import FastaParser, SequenceError, clean_sequence, handling_for
from models.specs import FamilySpec

GZIP_MAGIC = b"\x1f\x8b"
#: A FASTA line longer than this is refused (a sequence line of the longest protein is ~35 kB).
MAX_LINE = 4 * 2**20
#: Decompressed bytes produced per step: a gzip bomb is parsed (and refused) piece by piece.
INFLATE_STEP = 2**20


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    """What one job may hold, and how it is cut into chunks."""

    max_records: int  # records accepted
    max_residues: int  # residues accepted
    max_bytes: int  # bytes received (as sent: compressed if gzip)
    chunk_residues: int  # residues per chunk (a chunk holds at least one record)
    chunk_records: int  # records per chunk


@dataclass(slots=True)
class IntakeResult:
    """What intake accepted."""

    records: int  # records written to chunks
    residues: int  # their residues
    chunks: int  # chunk files written
    skipped: list[Failure] = field(default_factory=list)  # records left out (skip policy)
    input_bytes: int = 0  # bytes received


class Intake:
    """Feed it bytes (``feed``) or records (``add``), then ``finish``; chunk files appear under
    ``<job>/inputs/`` as they fill."""

    def __init__(
        self,
        store: ResultStore,
        job_dir: str,
        options: JobOptions,
        family: FamilySpec,
        limits: IntakeLimits,
        fasta: bool,
    ) -> None:
        self.store, self.job_dir, self.opt = store, job_dir, options
        self.family, self.limits, self.fasta = family, limits, fasta
        self.parser = FastaParser("the uploaded FASTA")
        self.number = 0  # records seen (1-based numbering)
        self.records = self.residues = self.bytes = 0
        self.skipped: list[Failure] = []
        self._chunk: list[tuple[int, str, str]] = []  # (record number, id, sequence)
        self._chunk_residues = 0
        self._full: list[list[tuple[int, str, str]]] = []
        self._chunks = 0
        # Duplicate ids are found at the end from 128-bit digests (16 bytes a record, not the
        # ids; two different ids share one with odds of ~1e-25 at 10^7 records).
        self._digests = array.array("Q")  # two words per record
        self._numbers = array.array("Q")
        self._inflate: zlib._Decompress | None = None
        self._text = codecs.getincrementaldecoder("utf-8")()
        self._carry = ""
        self._started = False

    # -- FASTA bytes ----------------------------------------------------------------------------
    async def feed(self, data: bytes) -> None:
        """The next piece of an upload (gzip detected from its first bytes)."""
        self.bytes += len(data)
        if self.bytes > self.limits.max_bytes:
            raise APIError(
                413,
                f"the upload exceeds {self.limits.max_bytes:,} bytes (job_max_bytes); split the "
                "input into several jobs",
                param="body",
                code="upload_too_large",
            )
        if not self._started:
            self._started = True
            if data[:2] == GZIP_MAGIC:
                self._inflate = zlib.decompressobj(wbits=31)
        if self._inflate is None:
            self._text_in(data)
        else:
            self._inflate_in(data)
        await self._write_full()

    def _inflate_in(self, data: bytes) -> None:
        assert self._inflate is not None
        try:
            out = self._inflate.decompress(data, INFLATE_STEP)
            while True:
                self._text_in(out)
                tail = self._inflate.unconsumed_tail
                if not tail:
                    break
                out = self._inflate.decompress(tail, INFLATE_STEP)
        except zlib.error as e:
            raise APIError(
                400, f"the upload is not valid gzip: {e}", param="body", code="invalid_fasta"
            ) from None

    def _text_in(self, data: bytes) -> None:
        try:
            text = self._carry + self._text.decode(data)
        except UnicodeDecodeError as e:
            raise APIError(
                400,
                f"the upload is not UTF-8 text (byte {e.start} of a piece): {e.reason}",
                param="body",
                code="invalid_fasta",
            ) from None
        lines = text.split("\n")
        self._carry = lines.pop()
        if len(self._carry) > MAX_LINE:
            raise APIError(
                400,
                f"a FASTA line is longer than {MAX_LINE:,} characters",
                param="body",
                code="invalid_fasta",
            )
        for line in lines:
            self._line(line)

    def _line(self, line: str) -> None:
        try:
            rec = self.parser.line(line)
        except ValueError as e:
            raise APIError(400, str(e), param="body", code="invalid_fasta") from None
        if rec is not None:
            self.add(*rec)

    # -- records --------------------------------------------------------------------------------
    def add(self, name: str, raw: str) -> None:
        """One record: validated, then added to the current chunk."""
        self.number += 1
        n = self.number
        if self.opt.strip_stop and raw.endswith("*"):
            raw = raw[:-1]
        try:
            seq = clean_sequence(raw, n - 1)
            handling_for(n - 1, len(seq), self.family.max_residues, self.opt.policy)
            if (why := member_name_problem(name)) is not None:
                raise SequenceError(n - 1, f"id {name!r} cannot name a result: {why}")
        except SequenceError as e:
            code = (
                "invalid_id"
                if "cannot name a result" in e.reason
                else "sequence_too_long"
                if "exceeds the model context" in e.reason
                else "invalid_sequence"
            )
            if self.opt.on_invalid == OnInvalid.skip:
                self.skipped.append(Failure(n, name, e.reason, code))
                return
            raise APIError(
                400,
                f"{self._where(n, name)}: {e.reason} (on_invalid=skip leaves such records out)",
                param=self._param(n, "ids" if code == "invalid_id" else "input"),
                code=code,
            ) from None
        self.records += 1
        self.residues += len(seq)
        lim = self.limits
        if self.records > lim.max_records:
            raise APIError(
                413,
                f"the job has more than {lim.max_records:,} records (job_max_records); split it",
                param=self._param(n),
                code="too_many_records",
            )
        if self.residues > lim.max_residues:
            raise APIError(
                413,
                f"the job has more than {lim.max_residues:,} residues (job_max_residues); split it",
                param=self._param(n),
                code="too_many_residues",
            )
        digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
        self._digests.frombytes(digest)
        self._numbers.append(n)
        if self._chunk and (
            self._chunk_residues + len(seq) > lim.chunk_residues
            or len(self._chunk) >= lim.chunk_records
        ):
            self._full.append(self._chunk)
            self._chunk, self._chunk_residues = [], 0
        self._chunk.append((n, name, seq))
        self._chunk_residues += len(seq)

    async def add_records(self, records: Iterable[tuple[str, str]]) -> None:
        """Records of a JSON body, (id, sequence) each; full chunks are written as they fill."""
        for name, raw in records:
            self.add(name, raw)
            if self._full:
                await self._write_full()

    def _where(self, n: int, name: str) -> str:
        return f"record {n} ({name})" if self.fasta else f"input[{n - 1}]"

    def _param(self, n: int, field: str = "input") -> str:
        return "body" if self.fasta else f"{field}[{n - 1}]"

    async def _write_full(self) -> None:
        full, self._full = self._full, []
        for chunk in full:
            await self._write(chunk)

    async def _write(self, chunk: list[tuple[int, str, str]]) -> None:
        numbers, ids, seqs = (list(col) for col in zip(*chunk, strict=True))
        path = self.store.path(self.job_dir, "inputs", f"{self._chunks}.json")
        body = {"numbers": numbers, "ids": ids, "seqs": seqs}
        await self.store.awrite_json(path, body)
        self._chunks += 1

    async def finish(self) -> IntakeResult:
        """Write the last chunk and check what can only be checked at the end."""
        if self.fasta:
            if self._inflate is not None and not self._inflate.eof:
                raise APIError(
                    400, "the gzip upload ended early", param="body", code="invalid_fasta"
                )
            if self._carry:
                self._line(self._carry)
                self._carry = ""
            try:
                rec = self.parser.end()
            except ValueError as e:
                raise APIError(400, str(e), param="body", code="invalid_fasta") from None
            if rec is not None:
                self.add(*rec)
        if not self.records:
            what = "no records" if not self.skipped else "no valid records"
            raise APIError(400, f"the job has {what}", param="input", code="empty_input")
        await self._check_unique_ids()
        if self._chunk:
            self._full.append(self._chunk)
            self._chunk = []
        await self._write_full()
        return IntakeResult(self.records, self.residues, self._chunks, self.skipped, self.bytes)

    async def _check_unique_ids(self) -> None:
        """Ids key the result: the first repeated one answers 400, naming both records."""
        words = np.frombuffer(self._digests, dtype=np.uint64).reshape(-1, 2)
        order = np.lexsort((words[:, 1], words[:, 0]))
        w = words[order]
        same = np.flatnonzero((w[1:] == w[:-1]).all(axis=1))
        if not same.size:
            return
        numbers = np.frombuffer(self._numbers, dtype=np.uint64)
        a, b = sorted(int(numbers[order[i]]) for i in (same[0], same[0] + 1))
        raise APIError(
            400,
            f"record {b} repeats the id of record {a}; ids must be unique (they key the result)",
            param=self._param(b, "ids"),
            code="duplicate_id",
        )
