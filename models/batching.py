"""Packing sequences into batches under a token budget that counts padding."""

from __future__ import annotations

from collections.abc import Sequence

from models.specs import family_spec


def default_token_budget(device_type: str, family: str = "esm2") -> int:
    """The default token budget of ``family`` on a device type ('cpu', 'cuda', …): defaults
    that depend on the family belong to it (``models.specs.FamilySpec.token_budgets``)."""
    return family_spec(family).token_budget(device_type)


def plan_batches(
    lengths: Sequence[int],
    token_budget: int,
    overhead: int = 0,
    rows: Sequence[int] | None = None,
) -> list[list[int]]:
    """Group indices into batches, longest first, so that rows × (max length + overhead) ≤ budget.

    A padded batch costs ``n_rows * (max(lengths) + overhead)`` tokens, where ``overhead`` is the
    number of special tokens a family adds per row and ``rows[i]`` the number of model rows item
    i needs (several for a chunked sequence; default 1).  Sorting by length first means each
    batch pads only up to its neighbours; an item over the budget gets a batch of its own.  Ties
    keep input order, so the plan is deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    n_rows = width = 0
    for i in order:
        r = 1 if rows is None else rows[i]
        # Longest first: the first item of a batch sets its width.
        if current and (n_rows + r) * width > token_budget:
            batches.append(current)
            current, n_rows = [], 0
        if not current:
            width = lengths[i] + overhead
        current.append(i)
        n_rows += r
    if current:
        batches.append(current)
    return batches


def fixed_batches(n: int, size: int) -> list[list[int]]:
    """Consecutive batches of ``size`` in input order (the naive baseline)."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Fraction of the padded token grid that is padding: 1 − Σ len / Σ rows·max len."""
    real = sum(lengths[i] for b in batches for i in b)
    grid = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1.0 - real / grid if grid else 0.0


def plan_packed(tokens: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group indices into packed batches of at most ``token_budget`` tokens (first-fit
    decreasing: longest first, each into the first batch with room for it).

    ``tokens[i]`` is what item i occupies in a packed (unpadded) row: its residues plus the
    family's special tokens, summed over its windows when chunked.  No row pads to a neighbour
    and the batches come out nearly full, so a compiled model's bucket rounding
    (:func:`bucket_tokens`) wastes little but in the last batch; an item over the budget gets a
    batch of its own.  Deterministic: ties keep input order, items keep it within a batch.
    """
    order = sorted(range(len(tokens)), key=lambda i: (-tokens[i], i))
    batches: list[list[int]] = []
    room: list[int] = []
    for i in order:
        slot = next((b for b, r in enumerate(room) if tokens[i] <= r), None)
        if slot is None:
            batches.append([])
            room.append(token_budget)
            slot = len(batches) - 1
        batches[slot].append(i)
        room[slot] -= tokens[i]
    return [sorted(b) for b in batches]


#: Packed batch sizes are rounded up to budget / 2^j for j < BUCKET_LEVELS (and to
#: budget · 2^j above the budget): a handful of shapes for compiled models.
BUCKET_LEVELS = 4
#: Bucket sizes are multiples of this (tensor-core friendly).
BUCKET_ALIGN = 64


def token_buckets(token_budget: int) -> list[int]:
    """The packed row lengths up to the budget: budget / 8, / 4, / 2, budget (64-aligned)."""
    sizes = {
        -(-max(BUCKET_ALIGN, token_budget >> j) // BUCKET_ALIGN) * BUCKET_ALIGN
        for j in range(BUCKET_LEVELS)
    }
    return sorted(sizes)


def bucket_tokens(tokens: int, token_budget: int) -> int:
    """The bucket a packed batch of ``tokens`` tokens is padded to: the smallest of
    :func:`token_buckets` that holds it; over the budget (one long or chunked item), the budget
    doubled until it does."""
    for size in token_buckets(token_budget):
        if tokens <= size:
            return size
    size = token_buckets(token_budget)[-1]
    while size < tokens:
        size *= 2
    return size
