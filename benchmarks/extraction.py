"""Extraction throughput per level, and RD-k vs the raw forward of the same chain prefix."""

from __future__ import annotations

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
from models.artifact import Artifact, load_artifact, save_artifact
from models.embedder import Embedder
from models.extract import Pooling
from models.families import build_chain
from models.fit import fit_artifact


def chain_for(family: str, quick: bool) -> list[str]:
    """Model refs of the benchmarked chain: random-weight ESM-2 8M → 35M (real sizes)."""
    if family == "esm2":
        if quick:
            return [str(random_esm2("8M", layers=1)), str(random_esm2("35M", layers=1))]
        return [str(random_esm2("8M")), str(random_esm2("35M"))]
    if family == "unirep":
        return ["64", "256"] if quick else ["64", "256", "1900"]
    raise ValueError(family)


def artifact_for(family, refs: list[str], cache_name: str) -> Artifact:
    """A projection fitted on 40 UniRef sequences (timing needs real shapes, not a good fit)."""
    from benchmarks.common import CACHE

    path = CACHE / f"{cache_name}.safetensors"
    if not path.exists():
        save_artifact(fit_artifact(family, uniref(40, max_len=400, seed=99)), path)
    return load_artifact(path)


def run(
    family_name: str = "esm2",
    n_seqs: int = 64,
    reps: int = 3,
    token_budget: int | None = None,
    quick: bool = False,
) -> dict[str, Any]:
    refs = chain_for(family_name, quick)
    family = build_chain(family_name, models=refs, device="cpu")
    art = artifact_for(family, refs, f"{family_name}-{'-'.join(lv.name for lv in family.levels)}")
    embedder = Embedder(family, art, token_budget=token_budget)
    ex = embedder.extractor
    seqs = uniref(n_seqs, max_len=1022, seed=1)
    residues = sum(map(len, seqs))
    plans, _ = ex.plan(seqs)
    last = len(family.levels) - 1

    def level_time(level: int) -> float:
        return timed(lambda: [ex.run(p, [level], Pooling.mean) for p in plans])

    per_level = interleaved(
        {lv.name: (lambda i=i: level_time(i)) for i, lv in enumerate(family.levels)}, reps
    )
    arms = {
        "raw_chain": lambda: timed(
            lambda: [ex.run(p, list(range(last + 1)), Pooling.mean) for p in plans]
        ),
        "rd_pooled": lambda: timed(lambda: embedder.compute(seqs, stop=last, pooling=Pooling.mean)),
        "raw_chain_per_residue": lambda: timed(
            lambda: [ex.run(p, list(range(last + 1)), Pooling.per_residue) for p in plans]
        ),
        "rd_per_residue": lambda: timed(
            lambda: embedder.compute(seqs, stop=last, pooling=Pooling.per_residue)
        ),
    }
    chain = interleaved(arms, reps)
    return {
        "family": family_name,
        "levels": [{"name": lv.name, "dim": lv.dim, "model": lv.model_id} for lv in family.levels],
        "sequences": len(seqs),
        "residues": residues,
        "token_budget": ex.token_budget,
        "residues_per_s": {
            name: summary([residues / t for t in ts]) for name, ts in per_level.items()
        },
        "chain_residues_per_s": {
            name: summary([residues / t for t in ts]) for name, ts in chain.items()
        },
        "rd_over_raw": {
            "pooled": ratio_summary(chain["raw_chain"], chain["rd_pooled"]),
            "per_residue": ratio_summary(chain["raw_chain_per_residue"], chain["rd_per_residue"]),
        },
    }


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"**Extraction — {res['family']}** ({res['sequences']} UniRef90 sequences, "
        f"{res['residues']:,} residues, budget {res['token_budget']} tokens, CPU)",
        "",
        "| level | dim | residues/s |",
        "|---|---|---|",
    ]
    for lv in res["levels"]:
        lines.append(
            f"| {lv['name']} | {lv['dim']} | {fmt_range(res['residues_per_s'][lv['name']], ',.0f')} |"
        )
    lines += [
        "",
        "| RD-k / raw chain throughput | ratio (target ≥ 0.95) |",
        "|---|---|",
        f"| mean-pooled | {fmt_range(res['rd_over_raw']['pooled'])} |",
        f"| per-residue | {fmt_range(res['rd_over_raw']['per_residue'])} |",
    ]
    return "\n".join(lines)


QUICK = {"n_seqs": 8, "reps": 1}
