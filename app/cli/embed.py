"""`rdserve embed`: embed a FASTA file offline, in this process."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from app.cli.inputs import OnInvalid, long_sequence_report, read_sequences, skipped_report
from app.cli.ui import (
    BudgetOpt,
    DeviceOpt,
    DtypeOpt,
    ModelsOpt,
    ThreadsOpt,
    comma_list,
    err,
    progress,
    user_errors,
)
from models.blocks import ItemFailure, assemble
from models.formats import member_name_problem, write_npy, write_npz
from models.sequences import LongSequencePolicy, Pooling, first_duplicate
from models.specs import family_spec

#: Sequences planned (length-sorted and batched) together: bounds memory; progress moves per
#: batch within a slice.
SLICE = 2048


def parse_pooling(text: str | Pooling) -> Pooling:
    """One spelling, per_residue; per-residue (the old CLI form) is accepted too."""
    try:
        return Pooling(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: choose mean, per_residue or bos") from None


def ids_path(out: Path) -> Path:
    """The sidecar that names the rows of a .npy: emb.npy → emb.ids.txt (one id per line)."""
    return out.with_suffix(".ids.txt")


def embed(
    fasta: Annotated[str, typer.Option(help="FASTA file (gzip too), or - for standard input")],
    dimensions: Annotated[int, typer.Option(help="k: output dims (≤ the artifact's max)")],
    out: Annotated[
        Path,
        typer.Option(
            help=".npy: N×k in FASTA order, ids in <name>.ids.txt beside it; .npz: one array "
            "per FASTA id (k, or L×k per residue)"
        ),
    ],
    pooling: Annotated[
        Pooling,
        typer.Option(
            parser=parse_pooling,
            metavar="<mean|per_residue|bos>",
            help="mean, per_residue (per-residue accepted) or bos",
        ),
    ] = Pooling.mean,
    long_sequence_policy: Annotated[
        LongSequencePolicy,
        typer.Option(help="sequences over the model context: error, truncate or chunk"),
    ] = LongSequencePolicy.truncate,
    normalize: Annotated[bool, typer.Option(help="L2-normalise after truncating to k")] = False,
    on_invalid: Annotated[
        OnInvalid,
        typer.Option(help="records with invalid residues: error (stop) or skip (report them)"),
    ] = OnInvalid.error,
    strip_stop: Annotated[
        bool, typer.Option(help="remove one trailing '*' (stop codon) from each record")
    ] = False,
    artifact: Annotated[
        Path | None, typer.Option(help="projection artifact (.safetensors), to run here")
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(help="an rdserve URL: run the file as a bulk job on its fleet instead"),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key for --server", envvar="RDSERVE_API_KEY")
    ] = None,
    models: ModelsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    token_budget: BudgetOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Embed a FASTA file into .npy (+ ids) or .npz keyed by FASTA id: in this process
    (--artifact), or as a bulk job on a server's fleet (--server)."""
    from models.embedder import Embedder
    from models.families.base import set_threads

    with user_errors():
        if out.suffix not in (".npy", ".npz"):
            raise ValueError("--out must end in .npy (N×k, ids beside it) or .npz (keyed by id)")
        if pooling == Pooling.per_residue and out.suffix != ".npz":
            raise ValueError("per-residue output is written as .npz (one L×k array per FASTA id)")
        if fasta != "-" and not Path(fasta).is_file():
            raise ValueError(f"--fasta {fasta}: no such file")
        if (artifact is None) == (server is None):
            raise ValueError("give --artifact (embed here) or --server (a bulk job), not both")
        if server is not None:
            opts = {
                "dimensions": dimensions,
                "pooling": pooling.value,
                "long_sequence_policy": long_sequence_policy.value,
                "normalize": normalize,
                "on_invalid": on_invalid.value,
                "strip_stop": strip_stop,
            }
            embed_remote(server, api_key, fasta, out, opts)
            return
        assert artifact is not None
        set_threads(threads)
        embedder = Embedder.from_artifact(
            artifact,
            models=comma_list(models) if models else None,
            device=device,
            dtype=dtype,
            token_budget=token_budget,
        )
        art = embedder.artifact
        family_spec(art.family).check_pooling(pooling)  # before any work, as the API does
        stop = art.level_for_dim(dimensions)
        recs = read_sequences(fasta, on_invalid=on_invalid, strip_stop=strip_stop)
        ids, seqs = recs.ids, recs.seqs
        if out.suffix == ".npz":
            if (dup := first_duplicate(ids)) is not None:
                raise ValueError(
                    f"FASTA ids must be unique for .npz output: {ids[dup[0]]!r} appears twice "
                    f"(sequences {dup[1] + 1} and {dup[0] + 1} read)"
                )
            for name in ids:
                if (why := member_name_problem(name)) is not None:
                    raise ValueError(f"FASTA id {name!r} cannot key an .npz member: {why}")
        note = long_sequence_report(ids, seqs, embedder.family.max_residues, long_sequence_policy)
        results: list[np.ndarray | None] = [None] * len(seqs)
        with progress("embed", len(seqs), sum(map(len, seqs))) as advance:
            for lo in range(0, len(seqs), SLICE):
                part = seqs[lo : lo + SLICE]
                # k: only the dims asked for are projected and copied off the device
                batches = embedder.iter_compute(
                    part, stop, 0, pooling, long_sequence_policy, k=dimensions
                )
                for done in batches:
                    for i, item in done:
                        if isinstance(item, ItemFailure):
                            raise ValueError(
                                f"record {ids[lo + i]!r} could not be embedded: {item.message}"
                            )
                        results[lo + i] = assemble(item.blocks, dimensions, normalize)
                    advance(len(done), sum(len(part[i]) for i, _ in done))
        vectors = [r for r in results if r is not None]
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".npz":
            write_npz(out, dict(zip(ids, vectors, strict=True)))
        else:
            write_npy(out, vectors)
            ids_path(out).write_text("".join(f"{i}\n" for i in ids))
        levels = art.levels[: stop + 1]
        where = f"{out} and {ids_path(out)}" if out.suffix == ".npy" else str(out)
        err.print(
            f"wrote {where} ({len(seqs)} sequences, k={dimensions}, levels run: "
            f"{', '.join(lv.name for lv in levels)})",
            highlight=False,
            soft_wrap=True,
        )
        if note:
            err.print(note, highlight=False, soft_wrap=True)
        if recs.skipped:
            report = skipped_report(recs.skipped, out.with_suffix(".skipped.tsv"))
            err.print(report, highlight=False, soft_wrap=True)


def embed_remote(server: str, api_key: str | None, fasta: str, out: Path, opts: dict) -> None:
    """The file as a bulk job on ``server`` (rdserve_client): streamed upload, progress while
    the fleet works, the result streamed to ``out`` (and its ids beside a .npy)."""
    import shutil
    import sys
    import tempfile

    from rdserve_client import Client

    with contextlib.ExitStack() as stack:
        if fasta == "-":  # the client uploads a file: spool standard input to one first
            spool = stack.enter_context(tempfile.NamedTemporaryFile(suffix=".fasta"))
            shutil.copyfileobj(sys.stdin.buffer, spool)
            spool.flush()
            fasta = spool.name
        rd = stack.enter_context(Client(server, api_key))
        job = rd.submit_job(fasta, **opts)
        err.print(f"job {job.id}: {job.info['records']['total']} records", highlight=False)
        info = job.wait(progress=True)
        if info["status"] != "succeeded":
            raise ValueError(f"job {job.id} {info['status']}: {info.get('error') or ''}")
        out.parent.mkdir(parents=True, exist_ok=True)
        job.download(out, out.suffix[1:])
        if out.suffix == ".npy":
            job.download(ids_path(out), "ids")
    where = f"{out} and {ids_path(out)}" if out.suffix == ".npy" else str(out)
    err.print(
        f"wrote {where} ({info['records']['done']} sequences, k={info['dimensions']}, on "
        f"{server}: {info['family']} {info['model']})",
        highlight=False,
        soft_wrap=True,
    )
    failures = [(f["record"], f["id"], f["error"]) for f in info["failures"]]
    if failures:
        report = skipped_report(failures, out.with_suffix(".skipped.tsv"))
        err.print(report, highlight=False, soft_wrap=True)
