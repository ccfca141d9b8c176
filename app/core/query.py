"""What a client asks for, checked before any work: the one place request limits and input
rules are applied (the service and bulk jobs alike)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.core.errors import APIError
from app.settings import Settings
from models.artifact import Artifact
from models.formats import member_name_problem
from models.sequences import (
    Handling,
    LongSequencePolicy,
    Pooling,
    SequenceError,
    clean_sequence,
    first_duplicate,
    handling_for,
)
from models.specs import FamilySpec


@dataclass(frozen=True, slots=True)
class EmbedQuery:
    """What a client asks for (already type-checked at the boundary)."""

    inputs: Sequence[str]  # sequences as sent (cleaned and checked here)
    ids: Sequence[str] | None = None  # one per input, unique, when given
    model: str | None = None  # the served family or artifact name, if named
    dimensions: int | None = None  # k (default: the artifact's full dim)
    pooling: Pooling = Pooling.mean  # mean | per_residue | bos
    policy: LongSequencePolicy = LongSequencePolicy.truncate  # for sequences over the context
    normalize: bool = False  # L2-normalise after truncating to k
    value_bytes: float = 4.0  # bytes per returned number in the response's encoding
    encoding: str = "binary"  # what value_bytes describes, for the 413 message


def check_query(
    q: EmbedQuery, artifact: Artifact, family: FamilySpec, s: Settings
) -> tuple[list[str], list[Handling], int]:
    """Cleaned sequences, how each is fed to the model, and k; APIError naming the fault (the
    model name is the service's to check)."""
    raw = q.inputs
    if not raw:
        raise APIError(
            400, "input must contain at least one sequence", param="input", code="empty_input"
        )
    if len(raw) > s.max_sequences:
        raise APIError(
            413,
            f"input has {len(raw)} sequences; the limit is {s.max_sequences} "
            "(GET /info lists the limits): split the request",
            param="input",
            code="too_many_sequences",
        )
    if q.ids is not None and len(q.ids) != len(raw):
        raise APIError(
            400,
            f"ids has {len(q.ids)} entries but input has {len(raw)}",
            param="ids",
            code="ids_length_mismatch",
        )
    # ids key the .npz output and must identify one item each.
    if q.ids is not None and (dup := first_duplicate(q.ids)) is not None:
        i, j = dup
        raise APIError(
            400,
            f"ids[{i}] repeats ids[{j}] ({q.ids[i]!r}); ids must be unique",
            param=f"ids[{i}]",
            code="duplicate_id",
        )
    for i, id_ in enumerate(q.ids or ()):
        if (why := member_name_problem(id_)) is not None:
            raise APIError(400, f"ids[{i}]: {why}", param=f"ids[{i}]", code="invalid_id")
    k = check_options(q.dimensions, q.pooling, artifact, family)
    seqs, handling = [], []
    total = 0
    for i, r in enumerate(raw):
        try:
            seq = clean_sequence(r, i)
        except SequenceError as e:
            raise APIError(
                400, f"input[{i}]: {e.reason}", param=f"input[{i}]", code="invalid_sequence"
            ) from None
        try:
            handling.append(handling_for(i, len(seq), family.max_residues, q.policy))
        except SequenceError as e:
            raise APIError(
                400, f"input[{i}]: {e.reason}", param=f"input[{i}]", code="sequence_too_long"
            ) from None
        total += len(seq)
        seqs.append(seq)
    if total > s.max_residues:
        raise APIError(
            413,
            f"input has {total} residues; the limit is {s.max_residues} "
            "(GET /info lists the limits): split the request",
            param="input",
            code="too_many_residues",
        )
    check_output_size(q, seqs, handling, k, artifact, family, s)
    return seqs, handling, k


def check_options(
    dimensions: int | None, pooling: Pooling, artifact: Artifact, family: FamilySpec
) -> int:
    """k (the artifact's full dim by default), checked, and the pooling the family supports;
    APIError 400 naming the field otherwise (requests and bulk jobs alike)."""
    k = dimensions if dimensions is not None else artifact.max_dim
    if not 1 <= k <= artifact.max_dim:
        raise APIError(
            400,
            f"dimensions must be between 1 and {artifact.max_dim}, got {k}",
            param="dimensions",
            code="invalid_dimensions",
        )
    try:
        family.check_pooling(pooling)
    except ValueError as e:
        raise APIError(400, str(e), param="pooling", code="unsupported_pooling") from None
    return k


def check_output_size(
    q: EmbedQuery,
    seqs: list[str],
    handling: list[Handling],
    k: int,
    artifact: Artifact,
    family: FamilySpec,
    s: Settings,
) -> None:
    """413 before any work when the answer would exceed max_output_bytes: the response in
    its encoding, or the float32 blocks up to k's level a worker sends back for it."""
    if q.pooling == Pooling.per_residue:
        cap = family.max_residues
        rows = sum(
            cap if h == Handling.truncated and cap else len(seq)
            for seq, h in zip(seqs, handling, strict=True)
        )
    else:
        rows = len(seqs)
    width = artifact.dims[artifact.level_for_dim(k)]
    size = max(rows * k * q.value_bytes, rows * width * 4)
    limit = s.max_output_bytes
    if size > limit:
        raise APIError(
            413,
            f"the response would take about {size / 2**20:,.1f} MiB ({rows:,} vectors × "
            f"{k} dims as {q.encoding}); the limit is {limit / 2**20:,.1f} MiB "
            "(max_output_bytes). Ask for binary output (Accept: application/x-npy, "
            "dtype float16), fewer dimensions or fewer sequences per request, or run a bulk "
            "job with `rdserve embed`.",
            param="input",
            code="output_too_large",
        )
