"""`rdserve embed`: embed a FASTA file offline, in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from app.cli.inputs import long_sequence_report, read_sequences
from app.cli.ui import (
    BudgetOpt,
    DeviceOpt,
    DtypeOpt,
    ModelsOpt,
    comma_list,
    err,
    progress_bar,
    user_errors,
)
from models.formats import write_npy, write_npz
from models.sequences import LongSequencePolicy, Pooling, first_duplicate

#: Sequences embedded per slice: bounds memory (each slice is length-sorted and batched).
SLICE = 2048


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
    models: ModelsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    token_budget: BudgetOpt = None,
) -> None:
    """Embed a FASTA file offline: .npy (N×k, FASTA order) or .npz keyed by FASTA id."""
    from models.embedder import Embedder

    with user_errors():
        pool = Pooling(pooling.replace("-", "_"))
        embedder = Embedder.from_artifact(
            artifact,
            models=comma_list(models) if models else None,
            device=device,
            dtype=dtype,
            token_budget=token_budget,
        )
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
        results: list[np.ndarray] = []
        with progress_bar() as bar:
            task = bar.add_task("embed", total=len(seqs), residues=0)
            res = 0
            for lo in range(0, len(seqs), SLICE):
                vecs, items = embedder.embed(
                    seqs[lo : lo + SLICE], dimensions, pool, long_sequence_policy, normalize
                )
                results.extend(vecs)
                res += sum(it.residues for it in items)
                bar.update(task, advance=len(vecs), residues=res)
        out.parent.mkdir(parents=True, exist_ok=True)
        if pool == Pooling.per_residue:
            write_npz(out, dict(zip(ids, results, strict=True)))
        else:
            write_npy(out, results)
        levels = embedder.artifact.levels[: stop + 1]
        err.print(
            f"wrote {out} ({len(seqs)} sequences, k={dimensions}, levels run: "
            f"{', '.join(lv.name for lv in levels)})"
        )
        if note:
            err.print(note)
