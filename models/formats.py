"""Array file formats rdserve writes: .npy (pooled, N×k) and .npz keyed by id (per residue).

The one place for both, used by the HTTP responses and the command line alike.
"""

from __future__ import annotations

import io
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

#: Longest .npz key (an id): zip allows 64 KiB names, but nothing that long is a name.
MAX_MEMBER_NAME = 256


def member_name_problem(name: str) -> str | None:
    """Why ``name`` cannot key an .npz member (None: it can).

    Members are ``<name>.npy`` and unzip tools extract them as paths, so a name must not climb
    out of the target directory ('..' parts, a leading '/'), use Windows separators, or carry
    control characters or lone surrogates (not encodable as UTF-8). '/' inside a name is kept
    (Pfam-style 'P12345/1-100'): extracted, it is a subdirectory.
    """
    if not name:
        return "an id must not be empty"
    if len(name) > MAX_MEMBER_NAME:
        return f"an id has at most {MAX_MEMBER_NAME} characters, got {len(name)}"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid Unicode text (it contains a lone surrogate)"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        return "an id must not contain control or invisible format characters"
    if "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        return (
            "an id must not contain '\\' nor empty, '.' or '..' path parts ('../x', '/x', 'a//b')"
        )
    return None


def write_npy(
    target: Path | BinaryIO, vectors: Sequence[np.ndarray], dtype: str = "float32"
) -> None:
    """Stack equal-length vectors into one little-endian N×k .npy of ``dtype`` (no pickle)."""
    arr = np.stack(vectors).astype(np.dtype(dtype).newbyteorder("<"))
    if isinstance(target, Path):
        with open(target, "wb") as fh:
            np.lib.format.write_array(fh, arr, allow_pickle=False)
    else:
        np.lib.format.write_array(target, arr, allow_pickle=False)


def write_npz(
    target: Path | BinaryIO, arrays: Mapping[str, np.ndarray], dtype: str | None = None
) -> None:
    """An uncompressed .npz (the format np.savez writes), one ``<key>.npy`` member per array.

    np.savez(**arrays) would take keys such as "file" or "allow_pickle" as its own arguments
    (an error, or an archive silently missing that array). No pickle: object arrays are refused.
    ``dtype`` (e.g. "float16") converts every array, little-endian.
    """
    write_npz_items(target, arrays.items(), dtype)


def write_npz_items(
    target: Path | BinaryIO, items: Iterable[tuple[str, np.ndarray]], dtype: str | None = None
) -> None:
    """write_npz from (key, array) pairs produced one at a time (a bulk job's result: the
    arrays are never all in memory)."""
    for _ in _write_members(target, items, dtype):
        pass


def _write_members(
    target: Path | BinaryIO, items: Iterable[tuple[str, np.ndarray]], dtype: str | None
) -> Iterator[None]:
    """Write .npz members one by one, yielding after each (what iter_npz streams from)."""
    cast = np.dtype(dtype).newbyteorder("<") if dtype else None
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in items:
            if (why := member_name_problem(key)) is not None:
                raise ValueError(f".npz key {key!r}: {why}")
            out = arr.astype(cast) if cast is not None else arr
            with zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(out), allow_pickle=False)
            yield


class _Sink(io.RawIOBase):
    """A write-only, unseekable stream whose bytes are taken out as they come."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.chunks.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        out, self.chunks = b"".join(self.chunks), []
        return out


def iter_npy(vectors: Sequence[np.ndarray], dtype: str = "float32") -> Iterator[bytes]:
    """The bytes of write_npy(vectors) in pieces: the header, then row blocks (no N×k copy)."""
    dt = np.dtype(dtype).newbyteorder("<")
    k = int(vectors[0].shape[-1]) if len(vectors) else 0
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header,
        {
            "descr": np.lib.format.dtype_to_descr(dt),
            "fortran_order": False,
            "shape": (len(vectors), k),
        },
    )
    yield header.getvalue()
    step = max(1, 2**20 // max(1, k * dt.itemsize))  # ~1 MiB per piece
    for lo in range(0, len(vectors), step):
        yield np.stack(vectors[lo : lo + step]).astype(dt).tobytes()


def iter_npz(arrays: Iterable[tuple[str, np.ndarray]], dtype: str | None = None) -> Iterator[bytes]:
    """The bytes of write_npz(arrays) member by member (zip data descriptors, no seeking)."""
    sink = _Sink()
    for _ in _write_members(sink, arrays, dtype):
        if chunk := sink.take():
            yield chunk
    if chunk := sink.take():  # the central directory, written on close
        yield chunk
