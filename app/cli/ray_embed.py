"""`rdserve ray-embed`: a FASTA file embedded on a Ray cluster into resumable shards
(``app.offline.ray_data``; needs the ``ray`` extra: pip install 'rdserve[ray]')."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli.embed import parse_pooling
from app.cli.inputs import OnInvalid
from app.cli.ui import BudgetOpt, DeviceOpt, err, user_errors
from models.sequences import LongSequencePolicy, Pooling


def ray_embed(
    artifact: Annotated[Path, typer.Option(help="projection artifact (readable on every node)")],
    fasta: Annotated[Path, typer.Option(help="FASTA file (gzip too), read by this process")],
    dimensions: Annotated[int, typer.Option(help="k: output dims (≤ the artifact's max)")],
    out: Annotated[
        str,
        typer.Option(help="output folder every node sees (or an fsspec URL): shards + manifest"),
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="parquet (id, sequence_sha256, embedding[k]) or npz (keyed by id)"
        ),
    ] = "parquet",
    pooling: Annotated[
        Pooling,
        typer.Option(parser=parse_pooling, metavar="<mean|per_residue|bos>", help="pooling"),
    ] = Pooling.mean,
    long_sequence_policy: Annotated[
        LongSequencePolicy, typer.Option(help="sequences over the context: error, truncate, chunk")
    ] = LongSequencePolicy.truncate,
    normalize: Annotated[bool, typer.Option(help="L2-normalise after truncating to k")] = False,
    on_invalid: Annotated[
        OnInvalid, typer.Option(help="records with invalid residues: error or skip")
    ] = OnInvalid.error,
    shard_records: Annotated[int, typer.Option(help="records per shard (the unit of resume)")] = (
        10_000
    ),
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: start a local Ray)")
    ] = None,
    actors: Annotated[
        int | None, typer.Option(help="embedder actors (default: one per GPU, else 1)")
    ] = None,
    gpus_per_actor: Annotated[
        float | None, typer.Option(help="GPUs per actor (default: 1 on a GPU cluster, else 0)")
    ] = None,
    device: DeviceOpt = "auto",
    token_budget: BudgetOpt = None,
) -> None:
    """Embed a FASTA file on a Ray cluster (Ray Data, one embedder per GPU) into resumable
    Parquet or .npz shards; run it again to resume."""
    with user_errors():
        try:
            import ray
        except ImportError:
            raise ValueError("ray-embed needs Ray: pip install 'rdserve[ray]'") from None
        from app.offline.ray_data import RunOptions, run
        from models.artifact import load_artifact
        from models.specs import family_spec

        art = load_artifact(artifact)
        if not 1 <= dimensions <= art.max_dim:
            raise ValueError(f"--dimensions must be between 1 and {art.max_dim}")
        family_spec(art.family).check_pooling(pooling)
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        options = RunOptions(
            artifact=str(artifact.resolve()),
            artifact_sha256=art.sha256,
            dimensions=dimensions,
            pooling=pooling.value,
            policy=long_sequence_policy.value,
            normalize=normalize,
            fmt=fmt,
            shard_records=shard_records,
        )
        report = run(
            fasta,
            out,
            options,
            actors=actors or max(1, gpus),
            gpus_per_actor=gpus_per_actor if gpus_per_actor is not None else float(gpus > 0),
            device=device,
            token_budget=token_budget,
            skip_invalid=on_invalid == OnInvalid.skip,
            max_residues=family_spec(art.family).max_residues,
        )
        err.print(
            f"{out}: {report.shards} shards, {report.records} records; ran {len(report.ran)} "
            f"now ({report.shards - len(report.ran)} were done) in {report.seconds:.1f} s"
            + (f"; skipped {len(report.skipped)} invalid record(s)" if report.skipped else ""),
            highlight=False,
            soft_wrap=True,
        )
