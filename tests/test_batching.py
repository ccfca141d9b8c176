"""Residue-budget batch planning."""

from __future__ import annotations

import random

from models.batching import fixed_batches, padding_fraction, plan_batches


def test_budget_counts_padding_and_special_tokens():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(500)]
    batches = plan_batches(lengths, 2048, overhead=2)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        width = max(lengths[i] for i in b) + 2
        assert len(b) * width <= 2048 or len(b) == 1


def test_longest_first_and_deterministic():
    lengths = [10, 50, 50, 20, 5]
    batches = plan_batches(lengths, 120)
    assert batches == [[1, 2], [3, 0, 4]]
    assert plan_batches(lengths, 120) == batches


def test_oversized_item_gets_its_own_batch():
    assert plan_batches([1000, 10, 10], 100) == [[0], [1, 2]]


def test_rows_weight_chunked_items():
    # item 0 needs 3 rows of width 10: costs 30 tokens.
    assert plan_batches([10, 10, 10], 40, rows=[3, 1, 1]) == [[0, 1], [2]]


def test_sorted_batches_pad_less_than_fixed():
    rng = random.Random(1)
    lengths = [rng.choice([20, 50, 400, 900]) for _ in range(256)]
    sorted_pad = padding_fraction(plan_batches(lengths, 8192), lengths)
    fixed_pad = padding_fraction(fixed_batches(len(lengths), 32), lengths)
    assert sorted_pad < 0.1 < fixed_pad
