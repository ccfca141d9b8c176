"""Packing sequences into batches under a token budget that counts padding."""

from __future__ import annotations

from collections.abc import Sequence

#: Default tokens per batch by device type.  On CPU, throughput *falls* with batch size once the
#: activations leave the cache (ESM-2 8M, 2 cores: ~7k residues/s at 1,536 tokens vs ~3k at
#: 8,192; benchmarks/results/extraction.json); a GPU needs large batches to stay busy.
DEFAULT_TOKEN_BUDGET = {"cpu": 1536, "cuda": 16384}


def default_token_budget(device_type: str) -> int:
    """The default token budget for a device type ('cpu', 'cuda', …)."""
    return DEFAULT_TOKEN_BUDGET.get(device_type, DEFAULT_TOKEN_BUDGET["cuda"])


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
