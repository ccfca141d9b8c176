"""Does this reproduce the paper? One command: fit RD on ESM-2 and print the win-rate table.

    python -m benchmarks.reproduce_paper \\
        --assays ../shared/data/proteingym/v1_cv_folds_singles \\
        --fasta ../shared/data/sequences/uniref90_sample_10k.fasta \\
        --out-dir benchmarks/results/reproduce-esm2 --device cuda

Fits reverse distillation for the chain ESM-2 8M → 35M → 150M → 650M → 3B (``--models``) on the
first 1,000 UniRef sequences (``--max-seqs``, the paper's fitting size), evaluates raw and RD
embeddings with the linear probe on the ProteinGym assays under ProteinGym's three fold schemes,
with the PCA baselines, and prints the paper's win-rate table (Catrina et al., ICLR 2026:
rd.650M > 650M 71.4 %, rd.3B > 3B 85.7 %, rd.3B > rd.650M 92.9 %) next to ours, per scheme.
It writes the artifact, the full report (``rdserve eval proteingym``'s .md/.csv/.png) and the
table (``paper-table.md``) under ``--out-dir``.

One pass of the chain over the fitting sequences gives both the RD fit and the baselines (the
joint moments are cached); the nested RD embedding of the full chain holds every shorter
chain's (its first 1,280 dims are RD of 8M → … → 650M), so one fit answers all three rows.

Real weights need the Hugging Face hub (or the models in the HF cache, or local model
directories given to ``--models``); a GPU makes the 3B model practical (3B alone runs about
47,000 residues/s on an H100 in bf16, docs/performance.md). Our CI has neither, so
``tests/test_eval_reproduce.py`` runs this script end to end on tiny random-weight ESM-2 models
(real configs and tokenizer), which checks the code path, not the paper's numbers; where a GPU
is lent it still has no hub access, so only the code path can be checked there too.
See docs/results/reproduce-esm2.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from models.evaluation.options import Probe
from models.evaluation.proteingym import Evaluation
from models.evaluation.stats import paired

ROOT = Path(__file__).resolve().parents[1]

PAPER_CHAIN = ("8M", "35M", "150M", "650M", "3B")
#: The paper's win rates (% of assays), keyed by (winner, baseline) in its level names.
PAPER = {
    ("rd.650M", "650M"): 71.4,
    ("rd.3B", "3B"): 85.7,
    ("rd.3B", "rd.650M"): 92.9,
}


def paper_rows(level_names: Sequence[str], dims: Sequence[int]) -> list[tuple[str, str, str, str]]:
    """(our config a, our config b, row label, the paper's key) for the paper's three rows.

    By name when the chain has the paper's 650M and 3B levels; otherwise the last two levels
    stand for 650M and 3B (a shorter or tiny chain checks the code path).
    """
    names = list(level_names)
    if "650M" in names and "3B" in names:
        mid, top = names.index("650M"), names.index("3B")
    else:
        mid, top = len(names) - 2, len(names) - 1
    m, t = names[mid], names[top]
    dm, dt = dims[mid], dims[top]
    return [
        (f"rd-{dm}", f"raw-{dm}", f"rd.{m} > {m}", "rd.650M > 650M"),
        (f"rd-{dt}", f"raw-{dt}", f"rd.{t} > {t}", "rd.3B > 3B"),
        (f"rd-{dt}", f"rd-{dm}", f"rd.{t} > rd.{m}", "rd.3B > rd.650M"),
    ]


def paper_table(ev: Evaluation, level_names: Sequence[str]) -> str:
    """Markdown: the paper's three win rates next to ours under every scheme evaluated."""
    rows = paper_rows(level_names, ev.dims)
    head = [
        "comparison",
        "paper",
        *(f"{s.short}: win rate (wins/n), mean Δρ [95% CI]" for s in ev.schemes),
    ]
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: |" + " ---: |" * len(ev.schemes)]
    for a, b, label, key in rows:
        winner, baseline = key.split(" > ")
        cells = [
            label + ("" if label == key else f" (as {key})"),
            f"{PAPER[(winner, baseline)]:.1f}%",
        ]
        for s in ev.schemes:
            p = paired(ev.matrix(a, s), ev.matrix(b, s))
            cells.append(
                f"{p.win_rate:.1f}% ({p.wins}/{p.n}), {p.mean:+.4f} [{p.ci[0]:+.4f}, {p.ci[1]:+.4f}]"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--assays", type=Path, action="append", required=True, help="CSV file or dir (repeatable)"
    )
    ap.add_argument(
        "--models",
        default=",".join(PAPER_CHAIN),
        help="the chain, smallest first (default: %(default)s)",
    )
    ap.add_argument(
        "--fasta", type=Path, help="fitting sequences (default: the packaged 1,000 UniRef90)"
    )
    ap.add_argument("--max-seqs", type=int, default=1000, help="first N fitting sequences")
    ap.add_argument("--folds", default="all", help="random, modulo, contiguous or all")
    ap.add_argument(
        "--max-len", type=int, default=1022, help="skip assays whose wild type is longer"
    )
    ap.add_argument("--max-variants", type=int, help="seeded subsample of variants per assay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe", default="standardised", choices=[p.value for p in Probe])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--token-budget", type=int)
    ap.add_argument(
        "--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "reproduce-esm2"
    )
    ap.add_argument(
        "--cache", type=Path, help="embeddings and moments cache (default: <out-dir>/cache)"
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    """Run everything; returns (and prints) the table."""
    from app.cli.inputs import read_sequences
    from models.artifact import save_artifact
    from models.evaluation.assays import find_assays, prepare_assays
    from models.evaluation.folds import parse_schemes
    from models.evaluation.proteingym import (
        EvalSettings,
        PooledChain,
        fit_baselines,
        run_proteingym,
    )
    from models.evaluation.report import write_reports
    from models.extract import Extractor
    from models.families import build_chain
    from models.fit import solve_artifact
    from models.projection import Projector
    from models.rd import Regressor
    from models.sequences import LongSequencePolicy, packaged_sample

    args = parse_args(argv)
    t0 = time.perf_counter()
    schemes = parse_schemes(args.folds)
    prepared = prepare_assays(
        find_assays(args.assays), schemes, args.max_len, args.max_variants, args.seed
    )
    for note in prepared.notes:
        print(f"note: {note}", file=sys.stderr)
    fasta = args.fasta or packaged_sample()
    seqs = read_sequences(fasta, args.max_seqs).seqs
    family = build_chain(
        "esm2", models=args.models.split(","), device=args.device, dtype=args.dtype
    )
    names = [lv.name for lv in family.levels]
    print(
        f"chain {' → '.join(names)} on {family.device}; {len(seqs):,} fitting sequences; "
        f"{len(prepared.assays)} assays; folds {', '.join(s.value for s in schemes)}",
        file=sys.stderr,
    )
    extractor = Extractor(family, args.token_budget)
    out = args.out_dir
    chain = PooledChain(extractor, args.cache or out / "cache")
    policy = LongSequencePolicy.truncate
    moments, _ = chain.fitting_moments(seqs, policy)
    artifact = solve_artifact(
        family, moments, seqs, Regressor.pcr, 1.0, policy, extractor.token_budget, fasta.name
    )
    out.mkdir(parents=True, exist_ok=True)
    art_path = out / f"esm2-{'-'.join(names)}.safetensors"
    artifact = save_artifact(artifact, art_path)
    t_fit = time.perf_counter() - t0
    baselines, baseline_fit = fit_baselines(chain, artifact, seqs, fasta.name)  # cached moments
    settings = EvalSettings(
        args.max_len, args.max_variants, args.seed, tuple(schemes), Probe(args.probe)
    )
    ev = run_proteingym(
        prepared,
        chain,
        Projector(artifact, family.device),
        settings,
        baselines=baselines,
        baseline_fit=baseline_fit,
    )
    command = "python -m benchmarks.reproduce_paper " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    write_reports(ev, artifact, art_path, out, "proteingym", [command])
    table = paper_table(ev, names)
    text = (
        f"# Reverse distillation on ESM-2 {' → '.join(names)}: the paper's win rates\n\n"
        f"{len(ev.results)} ProteinGym assays, linear probe, {len(seqs):,} fitting sequences "
        f"(`{fasta.name}`), artifact sha256 `{artifact.sha256[:16]}…`; fit {t_fit:,.0f} s, "
        f"all {time.perf_counter() - t0:,.0f} s. Full report: proteingym.md.\n\n{table}\n"
    )
    (out / "paper-table.md").write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    main()
