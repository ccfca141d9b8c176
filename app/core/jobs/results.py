"""A job's result files: one per finished chunk, then the whole result assembled from them in
record order (sync store I/O: callers run these in a thread).

Pooled results are kept as ``result.npy`` (N×k, record order) with ``ids.txt`` beside it, and
``result.npz`` keyed by id; per-residue results as ``result.npz`` (one L×k array per id).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

import numpy as np

from app.core.store import ResultStore
from models.formats import write_npz, write_npz_items

#: Result formats a client may ask for: file name and media type.
FORMATS = {
    "npz": ("result.npz", "application/x-npz"),
    "npy": ("result.npy", "application/x-npy"),
    "ids": ("ids.txt", "text/plain; charset=utf-8"),
}


def chunk_paths(store: ResultStore, job_dir: str, i: int, pooled: bool) -> tuple[str, str]:
    """(array file, summary file) of chunk i."""
    base = store.path(job_dir, "chunks", str(i))
    return f"{base}.{'npy' if pooled else 'npz'}", f"{base}.json"


def write_chunk(
    store: ResultStore,
    job_dir: str,
    i: int,
    ids: list[str],
    vectors: list[np.ndarray],
    pooled: bool,
    dtype: str,
    summary: dict,
) -> None:
    """Chunk i's arrays, then its summary (whose presence marks the chunk done)."""
    arrays, meta = chunk_paths(store, job_dir, i, pooled)
    cast = np.dtype(dtype).newbyteorder("<")
    with store.writer(arrays) as fh:
        if pooled:
            k = vectors[0].shape[-1] if vectors else 0
            stack = np.stack(vectors) if vectors else np.zeros((0, k))
            np.lib.format.write_array(fh, stack.astype(cast), allow_pickle=False)
        else:
            write_npz(fh, dict(zip(ids, vectors, strict=True)), dtype)
    store.write_json(meta, {**summary, "ids": ids})


def done_chunks(store: ResultStore, job_dir: str) -> dict[int, dict]:
    """Summaries of the chunks already done, by index."""
    out = {}
    for name in store.names(store.path(job_dir, "chunks")):
        if name.endswith(".json"):
            summary = store.read_json(store.path(job_dir, "chunks", name))
            if summary is not None:
                out[int(name[: -len(".json")])] = summary
    return out


def _load(store: ResultStore, path: str) -> np.ndarray:
    return np.load(io.BytesIO(store.read(path) or b""), allow_pickle=False)


def _pooled_rows(
    store: ResultStore, job_dir: str, n_chunks: int
) -> Iterator[tuple[str, np.ndarray]]:
    for i in range(n_chunks):
        arrays, meta = chunk_paths(store, job_dir, i, True)
        ids = store.read_json(meta)["ids"]
        if ids:
            yield from zip(ids, _load(store, arrays), strict=True)


def _residue_arrays(
    store: ResultStore, job_dir: str, n_chunks: int
) -> Iterator[tuple[str, np.ndarray]]:
    for i in range(n_chunks):
        arrays, meta = chunk_paths(store, job_dir, i, False)
        ids = store.read_json(meta)["ids"]
        if not ids:
            continue
        with store.open(arrays) as fh, zipfile.ZipFile(fh) as zf:
            for name in ids:
                yield name, np.load(io.BytesIO(zf.read(f"{name}.npy")), allow_pickle=False)


def assemble(
    store: ResultStore, job_dir: str, n_chunks: int, pooled: bool, k: int, dtype: str, n_ok: int
) -> int:
    """Write the result from the chunk files, in record order; returns result.npz's size."""
    npz = store.path(job_dir, FORMATS["npz"][0])
    if pooled:
        cast = np.dtype(dtype).newbyteorder("<")
        with store.writer(store.path(job_dir, FORMATS["npy"][0])) as fh:
            header = {"descr": np.lib.format.dtype_to_descr(cast), "fortran_order": False}
            np.lib.format.write_array_header_1_0(fh, {**header, "shape": (n_ok, k)})
            for i in range(n_chunks):
                arr = _load(store, chunk_paths(store, job_dir, i, True)[0])
                fh.write(np.ascontiguousarray(arr, dtype=cast).tobytes())
        with store.writer(store.path(job_dir, FORMATS["ids"][0])) as fh:
            for i in range(n_chunks):
                ids = store.read_json(chunk_paths(store, job_dir, i, True)[1])["ids"]
                fh.write("".join(f"{name}\n" for name in ids).encode())
        rows = _pooled_rows(store, job_dir, n_chunks)
    else:
        rows = _residue_arrays(store, job_dir, n_chunks)
    with store.writer(npz) as fh:
        write_npz_items(fh, rows)
    return store.size(npz)
