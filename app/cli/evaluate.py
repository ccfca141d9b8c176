"""`rdserve eval`: downstream benchmarks of an artifact's embeddings (needs the 'eval' extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli.ui import BudgetOpt, DeviceOpt, DtypeOpt, err, progress_bar, user_errors

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
    """Linear-probe Spearman on DMS assays: raw vs RD per level, plus the truncation curve."""
    import time

    from models.embedder import Embedder
    from models.evaluation.proteingym import (
        AssayResult,
        EvalSettings,
        Hooks,
        PooledChain,
        find_assays,
        run_proteingym,
    )
    from models.evaluation.report import write_reports
    from models.families.base import default_cache_dir

    with user_errors():
        given = [*assays, *(more_assays or [])]
        paths = find_assays(given)
        if max_variants is not None and max_variants < 10:
            raise ValueError("--max-variants must be ≥ 10 (5 folds of ≥ 2 variants)")
        embedder = Embedder.from_artifact(
            artifact, device=device, dtype=dtype, token_budget=token_budget
        )
        cache = embeddings_cache or default_cache_dir() / "eval-embeddings"
        chain = PooledChain(embedder.extractor, cache)
        settings = EvalSettings(max_len=max_len, max_variants=max_variants, seed=seed)
        command = _eval_command(
            artifact,
            given,
            [
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
        with progress_bar() as bar:
            total = bar.add_task("assays", total=len(paths), residues=0)
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
                bar.console.print(
                    f"{r.name}: L={r.length} n={r.n_variants} "
                    f"{'cached' if r.cached else f'embedded in {r.embed_seconds:.0f}s'}, "
                    f"raw-{d} ρ={r.scores[f'raw-{d}']:.3f}, rd-{d} ρ={r.scores[f'rd-{d}']:.3f}",
                    highlight=False,
                )
                bar.update(total, advance=1)

            def skipped(assay: str, reason: str) -> None:
                bar.console.print(f"{assay}: skipped ({reason})", highlight=False)
                bar.update(total, advance=1)

            ev = run_proteingym(
                paths,
                chain,
                embedder.projector,
                settings,
                Hooks(assay_start=start, batch=batch, assay_done=finished, skipped=skipped),
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
