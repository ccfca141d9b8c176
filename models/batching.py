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
