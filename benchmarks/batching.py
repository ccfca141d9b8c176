"""Length-sorted residue-budget batches vs fixed 32-sequence batches in input order."""

from __future__ import annotations

import random
from typing import Any

from benchmarks.common import (
    fmt_range,
    interleaved,
    random_esm2,
    ratio_summary,
    summary,
    timed,
    uniref,
)
from models.batching import default_token_budget, fixed_batches, padding_fraction, plan_batches
from models.families import build_chain


def run(
    n_seqs: int = 128,
    reps: int = 3,
    token_budget: int = default_token_budget("cpu"),
    quick: bool = False,
) -> dict[str, Any]:
    # Padding on the whole UniRef90 sample's length distribution (≤ 1022: the model's context).
    all_lengths = [len(s) for s in uniref(max_len=1022)]
    budget_batches = plan_batches(all_lengths, token_budget, overhead=2)
    fixed = fixed_batches(len(all_lengths), 32)
    padding = {
        "budget": padding_fraction(budget_batches, all_lengths),
        "fixed32": padding_fraction(fixed, all_lengths),
    }

    # Throughput on a random sample in file order (the naive baseline keeps that order).
    family = build_chain(
        "esm2", models=[str(random_esm2("8M", layers=1 if quick else None))], device="cpu"
    )
    seqs = uniref(max_len=1022)
    idx = sorted(random.Random(2).sample(range(len(seqs)), n_seqs))
    sample = [seqs[i] for i in idx]
    residues = sum(map(len, sample))

    def run_batches(groups: list[list[int]]) -> None:
        for g in groups:
            batch = family.encode([sample[i] for i in g])
            family.forward(0, batch)

    lengths = [len(s) for s in sample]
    arms = {
        "budget": lambda: timed(lambda: run_batches(plan_batches(lengths, token_budget, 2))),
        "fixed32": lambda: timed(lambda: run_batches(fixed_batches(len(sample), 32))),
    }
    times = interleaved(arms, reps)
    return {
        "model": "esm2 8M (random weights)" + (" 1 layer" if quick else ""),
        "token_budget": token_budget,
        "padding_fraction_uniref10k": padding,
        "sample": {
            "sequences": n_seqs,
            "residues": residues,
            "padding_budget": padding_fraction(plan_batches(lengths, token_budget, 2), lengths),
            "padding_fixed32": padding_fraction(fixed_batches(len(sample), 32), lengths),
        },
        "residues_per_s": {k: summary([residues / t for t in v]) for k, v in times.items()},
        "speedup_budget_over_fixed32": ratio_summary(times["fixed32"], times["budget"]),
    }


def markdown(res: dict[str, Any]) -> str:
    p = res["padding_fraction_uniref10k"]
    return "\n".join(
        [
            f"**Batching** — {res['model']}, budget {res['token_budget']} tokens, "
            f"{res['sample']['sequences']} sequences ({res['sample']['residues']:,} residues)",
            "",
            "| | residues/s | padding (UniRef 10k) |",
            "|---|---|---|",
            f"| length-sorted budget | {fmt_range(res['residues_per_s']['budget'], ',.0f')} | {p['budget']:.1%} |",
            f"| fixed 32, input order | {fmt_range(res['residues_per_s']['fixed32'], ',.0f')} | {p['fixed32']:.1%} |",
            "",
            f"Speed-up (target ≥ 1.3×): **{fmt_range(res['speedup_budget_over_fixed32'])}×**",
        ]
    )


QUICK = {"n_seqs": 16, "reps": 1}
