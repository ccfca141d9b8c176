"""Writing .npz archives keyed by arbitrary strings (FASTA ids, request ids)."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np


def write_npz(target: Path | BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    """An uncompressed .npz (the format np.savez writes), one ``<key>.npy`` member per array.

    np.savez(**arrays) would take keys such as "file" or "allow_pickle" as its own arguments
    (an error, or an archive silently missing that array). No pickle: object arrays are refused.
    """
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
