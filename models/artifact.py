"""Projection artifacts: one safetensors file per fitted chain, JSON metadata in its header."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from models import __version__
from models.rd import StepParams, StepStats
from models.specs import Level

FORMAT = "rdserve.projection/1"
_META_KEY = "rdserve"
_TENSORS = ("weight", "input_mean", "output_mean", "residual_mean", "components")


class ArtifactError(ValueError):
    """A projection artifact is missing, corrupt, or does not match the runtime models."""


@dataclass(frozen=True)
class Artifact:
    """A fitted chain: levels, per-step parameters and provenance."""

    family: str  # model family registry name
    levels: tuple[Level, ...]  # the chain, smallest first
    steps: tuple[StepParams, ...]  # len(levels) − 1 fitted steps
    stats: tuple[StepStats, ...]  # diagnostics per step
    regressor: str  # pcr | ols | ridge (| reference-import variants)
    alpha: float | None = None  # ridge penalty, if any
    fitting: dict[str, Any] = field(default_factory=dict)  # data hash, counts, policy, source
    rdserve_version: str = __version__  # version that wrote it
    sha256: str = ""  # sha256 of the file bytes (set by save/load)

    @property
    def dims(self) -> list[int]:
        return [lv.dim for lv in self.levels]

    @property
    def max_dim(self) -> int:
        return self.levels[-1].dim

    @property
    def name(self) -> str:
        """Human name, e.g. 'esm2-8M-35M-150M'."""
        return "-".join([self.family, *(lv.name for lv in self.levels)])

    def level_for_dim(self, k: int) -> int:
        """Index of the smallest level whose dim ≥ k (the chain prefix a k-dim request needs)."""
        if not 1 <= k <= self.max_dim:
            raise ValueError(f"dimensions must be in [1, {self.max_dim}], got {k}")
        return next(i for i, d in enumerate(self.dims) if d >= k)

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-able data."""
        return {
            "format": FORMAT,
            "family": self.family,
            "levels": [asdict(lv) for lv in self.levels],
            "regressor": self.regressor,
            "alpha": self.alpha,
            "fitting": self.fitting,
            "steps": [asdict(s) for s in self.stats],
            "rdserve_version": self.rdserve_version,
        }


def save_artifact(artifact: Artifact, path: str | Path) -> Artifact:
    """Write atomically (temp file + rename); returns the artifact with its sha256 set."""
    from safetensors.numpy import save

    _check_shapes(artifact.levels, artifact.steps)
    tensors = {
        f"step{i}.{name}": np.ascontiguousarray(getattr(step, name), dtype=np.float64)
        for i, step in enumerate(artifact.steps)
        for name in _TENSORS
    }
    # sort_keys keeps the header byte-identical for identical fits.
    meta = json.dumps(
        {**artifact.metadata(), "tensors_sha256": _tensor_digest(tensors)}, sort_keys=True
    )
    data = save(tensors, metadata={_META_KEY: meta})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return replace(artifact, sha256=hashlib.sha256(data).hexdigest())


def load_artifact(path: str | Path) -> Artifact:
    """Read and validate an artifact; ArtifactError says precisely what is wrong."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read projection artifact: {e.strerror}") from e
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not a valid safetensors file ({e})") from e
    raw_meta = (header.get("__metadata__") or {}).get(_META_KEY)
    if raw_meta is None:
        raise ArtifactError(
            f"{path}: no '{_META_KEY}' metadata; not an rdserve projection artifact"
        )
    try:
        meta = json.loads(raw_meta)
        if meta.get("format") != FORMAT:
            raise ArtifactError(
                f"{path}: unsupported format {meta.get('format')!r}; expected {FORMAT}"
            )
        levels = tuple(Level(**lv) for lv in meta["levels"])
        stats = tuple(StepStats(**s) for s in meta["steps"])
        family, regressor = str(meta["family"]), str(meta["regressor"])
        for lv in levels:
            if not isinstance(lv.dim, int) or isinstance(lv.dim, bool) or lv.dim < 1:
                raise TypeError(f"level {lv.name!r}: dim must be a positive integer: {lv.dim!r}")
    except ArtifactError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # JSONDecodeError included
        raise ArtifactError(f"{path}: malformed metadata ({type(e).__name__}: {e})") from e
    if len(levels) < 2 or len(stats) != len(levels) - 1:
        raise ArtifactError(
            f"{path}: metadata lists {len(levels)} levels and {len(stats)} step records; "
            "need ≥ 2 levels and one record per step"
        )
    steps = []
    for i in range(len(levels) - 1):
        parts = {}
        for name in _TENSORS:
            key = f"step{i}.{name}"
            if key not in tensors:
                raise ArtifactError(f"{path}: missing tensor {key!r}")
            arr = tensors[key]
            if not np.all(np.isfinite(arr)):
                raise ArtifactError(f"{path}: tensor {key!r} contains NaN or infinity")
            parts[name] = arr
        steps.append(StepParams(**parts))
    extra = set(tensors) - {f"step{i}.{n}" for i in range(len(steps)) for n in _TENSORS}
    if extra:
        raise ArtifactError(f"{path}: unexpected tensors {sorted(extra)}")
    try:
        _check_shapes(levels, tuple(steps))
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    # After the shape checks, which name the problem more precisely.
    want = meta.get("tensors_sha256")  # absent in artifacts written before it was recorded
    if want is not None and _tensor_digest(tensors) != want:
        raise ArtifactError(
            f"{path}: tensor data does not match the checksum in its metadata (corrupt file?)"
        )
    return Artifact(
        family=family,
        levels=levels,
        steps=tuple(steps),
        stats=stats,
        regressor=regressor,
        alpha=meta.get("alpha"),
        fitting=meta.get("fitting", {}),
        rdserve_version=meta.get("rdserve_version", "unknown"),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _tensor_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _check_shapes(levels: tuple[Level, ...], steps: tuple[StepParams, ...]) -> None:
    if len(steps) != len(levels) - 1:
        raise ArtifactError(
            f"{len(levels)} levels need {len(levels) - 1} steps, found {len(steps)}"
        )
    for i, step in enumerate(steps):
        d_in, d_out = levels[i].dim, levels[i + 1].dim
        want = {
            "weight": (d_out, d_in),
            "input_mean": (d_in,),
            "output_mean": (d_out,),
            "residual_mean": (d_out,),
            "components": (d_out - d_in, d_out),
        }
        for name, shape in want.items():
            got = getattr(step, name).shape
            if got != shape:
                raise ArtifactError(
                    f"tensor 'step{i}.{name}' has shape {tuple(got)}, expected {shape} "
                    f"for levels {levels[i].name} ({d_in}) → {levels[i + 1].name} ({d_out})"
                )


def check_levels_match(artifact: Artifact, family: str, levels: tuple[Level, ...]) -> list[str]:
    """Compare runtime levels with the artifact; raise on dim/family mismatch, return warnings.

    Dims must match exactly.  Model ids and revisions may legitimately differ (a local copy of
    a hub model), so those differences are returned as warnings for the caller to log.
    """
    if family != artifact.family:
        raise ArtifactError(
            f"artifact was fitted for family {artifact.family!r}, runtime is {family!r}"
        )
    if len(levels) != len(artifact.levels):
        raise ArtifactError(
            f"artifact has {len(artifact.levels)} levels, runtime chain has {len(levels)}"
        )
    warnings = []
    for i, (a, r) in enumerate(zip(artifact.levels, levels, strict=True)):
        if a.dim != r.dim:
            raise ArtifactError(
                f"level {i} ({a.name}): artifact expects dim {a.dim}, runtime model "
                f"{r.model_id} has dim {r.dim}"
            )
        # A local copy named like the artifact's level (the family names copies of published
        # models by their size) is the same model: nothing to warn about.
        same_copy = a.name == r.name and Path(r.model_id).is_dir()
        if (a.model_id, a.revision) != (r.model_id, r.revision) and not same_copy:
            warnings.append(
                f"level {i} ({a.name}): artifact was fitted on "
                f"{a.model_id}@{a.revision or 'default'}, "
                f"runtime uses {r.model_id}@{r.revision or 'default'}"
            )
    return warnings
