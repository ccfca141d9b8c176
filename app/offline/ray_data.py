"""A FASTA file embedded on a Ray cluster: Ray Data runs the same Embedder as ``rdserve embed``
in an actor pool (one embedder per actor — per GPU on a GPU cluster), shard by shard; Ray does
the scheduling, retries and placement.

The driver streams the FASTA once into input shards of ``shard_records`` records (validated as
``rdserve embed`` validates them); each actor call takes one shard, embeds it (the embedder
plans length-sorted batches within it) and writes its output shard atomically — Parquet (id,
sequence_sha256, embedding as a fixed-size list of k float32) or .npz keyed by id. A run that
stops (a crash, a lost node, Ctrl-C) is resumed by running it again: shards whose output exists
are not run again. Everything lives under ``out`` (a directory every node sees, or an fsspec URL).
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core.store import ResultStore
from models.sequences import (
    LongSequencePolicy,
    Pooling,
    SequenceError,
    clean_sequence,
    first_duplicate,
    handling_for,
    iter_fasta,
)

log = logging.getLogger(__name__)

FORMATS = ("parquet", "npz")


@dataclass(frozen=True)
class RunOptions:
    """What a run computes: a resumed run must ask for the same."""

    artifact: str  # path of the projection artifact (readable on every node)
    artifact_sha256: str  # its hash (a resumed run checks it)
    dimensions: int  # k
    pooling: str = Pooling.mean.value
    policy: str = LongSequencePolicy.truncate.value
    normalize: bool = False
    fmt: str = "parquet"  # parquet (pooled only) | npz
    shard_records: int = 10_000


@dataclass
class RunReport:
    """What a run did."""

    shards: int  # shards in all
    ran: list[int] = field(default_factory=list)  # shards run now (the others were done)
    records: int = 0  # records in all (valid ones)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (record, id, reason)
    seconds: float = 0.0


def shard_name(i: int, kind: str) -> str:
    return f"in-{i:05d}.fasta" if kind == "in" else f"part-{i:05d}.{kind}"


def make_shards(
    fasta: str | Path,
    store: ResultStore,
    shard_records: int,
    max_residues: int | None,
    policy: LongSequencePolicy,
    skip_invalid: bool,
) -> tuple[int, int, list[tuple[int, str, str]]]:
    """Stream the FASTA into input shards (validated, ids unique); returns (shards, records,
    skipped). Only ids are kept in memory (for the uniqueness check), never the sequences."""
    shards, records, ids = 0, 0, []
    skipped: list[tuple[int, str, str]] = []
    buf: list[str] = []

    def flush() -> None:
        nonlocal shards, buf
        store.write(store.path("shards", shard_name(shards, "in")), "".join(buf).encode())
        shards, buf = shards + 1, []

    for number, (name, raw) in enumerate(iter_fasta(fasta), start=1):
        try:
            seq = clean_sequence(raw, number - 1)
            handling_for(number - 1, len(seq), max_residues, policy)
        except SequenceError as e:
            if not skip_invalid:
                raise ValueError(f"{fasta}: record {number} ({name}): {e.reason}") from None
            skipped.append((number, name, e.reason))
            continue
        ids.append(name)
        buf.append(f">{name}\n{seq}\n")
        records += 1
        if len(buf) == shard_records:
            flush()
    if buf:
        flush()
    if (dup := first_duplicate(ids)) is not None:
        raise ValueError(f"{fasta}: id {ids[dup[0]]!r} appears twice; ids key the output")
    return shards, records, skipped


class EmbedShards:
    """A Ray Data actor: one Embedder (loaded once per actor), one shard per call."""

    def __init__(self, out: str, options: dict, device: str, token_budget: int | None) -> None:
        from models.embedder import Embedder

        self.store = ResultStore(out)
        self.opt = RunOptions(**options)
        self.embedder = Embedder.from_artifact(
            Path(self.opt.artifact), device=device, token_budget=token_budget
        )
        self.stop = self.embedder.artifact.level_for_dim(self.opt.dimensions)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        done: dict[str, list] = {"shard": [], "records": [], "residues": [], "seconds": []}
        for shard in batch["shard"].tolist():
            t0 = time.perf_counter()
            n, residues = self.embed_shard(int(shard))
            done["shard"].append(int(shard))
            done["records"].append(n)
            done["residues"].append(residues)
            done["seconds"].append(time.perf_counter() - t0)
        return done

    def embed_shard(self, shard: int) -> tuple[int, int]:
        """Embed one input shard and write its output shard (atomically)."""
        from models.blocks import ItemFailure, assemble

        opt = self.opt
        data = self.store.read(self.store.path("shards", shard_name(shard, "in"))) or b""
        recs = list(_records(data.decode()))
        seqs = [s for _, s in recs]
        vectors: list[np.ndarray | None] = [None] * len(seqs)
        for batch in self.embedder.iter_compute(
            seqs,
            self.stop,
            0,
            Pooling(opt.pooling),
            LongSequencePolicy(opt.policy),
            k=opt.dimensions,  # only the dims asked for are projected and copied off the device
        ):
            for i, item in batch:
                if isinstance(item, ItemFailure):
                    raise RuntimeError(f"shard {shard}: {recs[i][0]}: {item.message}")
                vectors[i] = assemble(item.blocks, opt.dimensions, opt.normalize)
        path = self.store.path(shard_name(shard, opt.fmt))
        with self.store.writer(path) as fh:
            if opt.fmt == "npz":
                from models.formats import write_npz

                write_npz(fh, {name: v for (name, _), v in zip(recs, vectors, strict=True)})
            else:
                _write_parquet(fh, recs, vectors, opt.dimensions)
        return len(recs), sum(map(len, seqs))


def _records(text: str) -> Any:
    lines = text.splitlines()
    for i in range(0, len(lines), 2):
        yield lines[i][1:], lines[i + 1]


def _write_parquet(fh: Any, recs: list[tuple[str, str]], vectors: list, k: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = pa.array(np.concatenate(vectors).astype(np.float32, copy=False))
    table = pa.table(
        {
            "id": pa.array([name for name, _ in recs], pa.string()),
            "sequence_sha256": pa.array(
                [hashlib.sha256(s.encode()).hexdigest() for _, s in recs], pa.string()
            ),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, k),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fh.write(buf.getvalue())


def run(
    fasta: str | Path,
    out: str,
    options: RunOptions,
    *,
    actors: int,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    device: str = "auto",
    token_budget: int | None = None,
    skip_invalid: bool = False,
    max_residues: int | None = None,
) -> RunReport:
    """Embed ``fasta`` into shards under ``out`` on the Ray cluster ``ray.init`` connected to;
    resumes a run stopped earlier (same options) by running only the shards without output."""
    import ray

    t0 = time.perf_counter()
    if options.fmt not in FORMATS:
        raise ValueError(f"format {options.fmt!r}: choose {' or '.join(FORMATS)}")
    if options.fmt == "parquet" and options.pooling == Pooling.per_residue.value:
        raise ValueError("per-residue output is written as npz shards (--format npz)")
    store = ResultStore(out)
    manifest = store.read_json(store.path("manifest.json"))
    if manifest is not None:
        if manifest["options"] != asdict(options):
            raise ValueError(
                f"{out} holds a run with other options ({manifest['options']}); use another "
                "output folder"
            )
        shards, records, skipped = manifest["shards"], manifest["records"], manifest["skipped"]
    else:
        shards, records, skipped = make_shards(
            fasta,
            store,
            options.shard_records,
            max_residues,
            LongSequencePolicy(options.policy),
            skip_invalid,
        )
        store.write_json(
            store.path("manifest.json"),
            {
                "options": asdict(options),
                "source": str(fasta),
                "shards": shards,
                "records": records,
                "skipped": skipped,
            },
        )
    done = set(store.names(store.path("")))
    pending = [i for i in range(shards) if shard_name(i, options.fmt) not in done]
    report = RunReport(shards, pending, records, [tuple(s) for s in skipped])
    if pending:
        log.info("embedding shards", extra={"pending": len(pending), "shards": shards})
        ds = ray.data.from_items([{"shard": i} for i in pending], override_num_blocks=len(pending))
        results = ds.map_batches(
            EmbedShards,
            fn_constructor_kwargs={
                "out": out,
                "options": asdict(options),
                "device": device,
                "token_budget": token_budget,
            },
            batch_size=1,
            concurrency=actors,
            num_gpus=gpus_per_actor,
            num_cpus=cpus_per_actor,
        ).take_all()
        assert sorted(r["shard"] for r in results) == pending
    report.seconds = time.perf_counter() - t0
    return report


def read_output(out: str) -> dict[str, np.ndarray]:
    """Every shard's embeddings keyed by id, in record order (for checks and small runs)."""
    import pyarrow.parquet as pq

    store = ResultStore(out)
    manifest = store.read_json(store.path("manifest.json"))
    fmt = manifest["options"]["fmt"]
    got: dict[str, np.ndarray] = {}
    for i in range(manifest["shards"]):
        data = store.read(store.path(shard_name(i, fmt))) or b""
        if fmt == "npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                got |= {name: z[name] for name in z.files}
        else:
            table = pq.read_table(io.BytesIO(data))
            emb = table.column("embedding").combine_chunks()
            k = emb.type.list_size
            rows = emb.flatten().to_numpy().reshape(-1, k)
            got |= dict(zip(table.column("id").to_pylist(), rows, strict=True))
    return got
