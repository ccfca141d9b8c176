"""Array file formats rdserve writes: .npy (pooled, N×k) and .npz keyed by id (per residue).

The one place for both, used by the HTTP responses and the command line alike.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np


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
    cast = np.dtype(dtype).newbyteorder("<") if dtype else None
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays.items():
            out = arr.astype(cast) if cast is not None else arr
            with zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(out), allow_pickle=False)
