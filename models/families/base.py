"""The small interface every model family implements."""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from models.errors import LevelMismatchError, WeightsUnavailableError
from models.specs import FamilySpec, Level

__all__ = [
    "CompileOptions",
    "Level",
    "LevelMismatchError",
    "LevelOutput",
    "ModelFamily",
    "WeightsUnavailableError",
]


@dataclass(slots=True)
class LevelOutput:
    """Final-layer representations of one batch, aligned to residues.

    Padded batch: ``residues`` (B, T, d), [b, t] residue t of row b, and ``mask`` (B, T) True
    on real residues.  Packed batch: ``residues`` (Σ row lengths, d), rows back to back in
    batch order, and ``mask`` None.
    """

    residues: torch.Tensor  # float32
    mask: torch.Tensor | None  # (B, T) bool, or None when packed
    bos: torch.Tensor | None  # (B, d) float32 start-token representation, if the family has one


@dataclass(frozen=True, slots=True)
class CompileOptions:
    """How a family compiles its models (``torch.compile``) as they load."""

    cache_dir: Path | None = None  # inductor / Triton caches; None: torch's default (/tmp)
    backend: str = "inductor"  # "eager" / "aot_eager" trace without generating code (tests)
    mode: str | None = None  # torch.compile mode, e.g. "max-autotune"

    def apply_cache_dir(self) -> None:
        """Point torch's compile caches (inductor's FX graph and AOT caches, Triton's kernels)
        at ``cache_dir``, so that a restart reuses them.  They are environment variables, read
        whenever a cache is used: this process's, and inherited by its children."""
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache_dir / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(self.cache_dir / "triton")


def default_cache_dir() -> Path:
    """Where rdserve keeps downloaded weights: $RDSERVE_CACHE_DIR or ~/.cache/rdserve."""
    return Path(os.environ.get("RDSERVE_CACHE_DIR") or Path.home() / ".cache" / "rdserve")


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers),
    which ``os.cpu_count()`` and torch's default thread count both ignore."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """ceil(quota / period) of the cgroup CPU limit (v2 cpu.max, or v1 cfs files); None: none."""
    try:
        text = (root / "cpu.max").read_text().split()
        quota, period = (None if text[0] == "max" else int(text[0])), int(text[1])
    except (OSError, ValueError, IndexError):
        try:
            quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            return None
        quota = None if quota <= 0 else quota
    if quota is None or period <= 0:
        return None
    return -(-quota // period)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: ``OMP_NUM_THREADS`` when set, else
    :func:`available_cpus`); returns the number set.

    Torch's own default is the machine's core count, which oversubscribes a container's quota
    or a host shared with other processes: each parallel region ends at a barrier, so one
    preempted thread stalls the rest (benchmarks/contention.py).
    """
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    n = threads or (int(omp) if omp.isdigit() and int(omp) > 0 else available_cpus())
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


def pick_device(device: str | None) -> torch.device:
    """'auto'/None → CUDA when available, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """'auto'/None → bf16 on CUDA with bf16 support, fp16 on older CUDA, fp32 on CPU."""
    if dtype in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}")
    return table[dtype]


class ModelFamily(ABC):
    """A chain of models of one family, loaded lazily per level.

    Class attributes describe the family without loading anything (the API process uses them);
    an instance owns the loaded models of one chain on one device.
    """

    name: ClassVar[str]  # registry name, e.g. "esm2"
    max_residues: ClassVar[int | None]  # context limit in residues; None = unlimited
    special_tokens: ClassVar[int]  # tokens added per sequence (counted in batch budgets)
    has_bos: ClassVar[bool]  # whether a start-token representation exists ('bos' pooling)
    supports_packing: ClassVar[bool] = False  # encode(seqs, pad_to=…) packs rows (varlen)

    def __init_subclass__(cls, spec: FamilySpec | None = None, **kw: Any) -> None:
        """``class X(ModelFamily, spec=FAMILY_SPECS[...])``: the torch-free spec is the source."""
        super().__init_subclass__(**kw)
        if spec is not None:
            cls.name, cls.max_residues = spec.name, spec.max_residues
            cls.special_tokens, cls.has_bos = spec.special_tokens, spec.has_bos

    def __init__(
        self,
        levels: Sequence[Level],
        device: str | None = None,
        dtype: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        if not levels:
            raise ValueError("a chain needs at least one level")
        dims = [lv.dim for lv in levels]
        if dims != sorted(dims) or len(set(dims)) != len(dims):
            raise ValueError(f"levels must be ordered by strictly increasing dim, got {dims}")
        self.levels: tuple[Level, ...] = tuple(levels)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._models: dict[int, torch.nn.Module] = {}
        self._lock = threading.Lock()
        self.packed = False  # batches are packed rows (set_fast_path)
        self.compile_options: CompileOptions | None = None

    def set_fast_path(self, packed: bool = False, compile: CompileOptions | None = None) -> None:
        """Packed (unpadded, variable-length attention) batches and/or compiled models.

        Compiling implies packing: packed rows are bucketed to a handful of lengths, so a
        compiled model sees a handful of shapes.  Set before any level loads.
        """
        if (packed or compile is not None) and not self.supports_packing:
            raise ValueError(
                f"family {self.name!r} cannot pack batches (needed for packed and compiled runs)"
            )
        if self._models:
            raise RuntimeError("set the fast path before loading models")
        self.packed = packed or compile is not None
        self.compile_options = compile
        if compile is not None:
            compile.apply_cache_dir()

    @classmethod
    @abstractmethod
    def resolve_levels(cls, refs: Sequence[str], revision: str | None = None) -> list[Level]:
        """Turn user model references (shorthands, hub ids, paths) into levels with dims."""

    @classmethod
    def unavailable(cls, levels: Sequence[Level]) -> str | None:
        """Why these levels' weights cannot be had here, found in seconds (None: they can, as
        far as can be told without loading them). Used to pick the default family."""
        return None

    @abstractmethod
    def encode(self, seqs: Sequence[str]) -> Any:
        """Tokenise a batch once; the result is fed to forward() of every level."""

    @abstractmethod
    def _load(self, level: int) -> torch.nn.Module:
        """Load one level's model in eval mode on self.device."""

    @abstractmethod
    def _forward(self, model: torch.nn.Module, batch: Any) -> LevelOutput:
        """Run one loaded model on an encoded batch."""

    def load(self, level: int) -> torch.nn.Module:
        """Load a level (once; thread-safe) and return its model (compiled, if so configured:
        the code is generated at the first batch of each shape)."""
        with self._lock:
            if level not in self._models:
                model = self._load(level)
                if self.compile_options is not None:
                    model = self._compile(model, self.compile_options)
                self._models[level] = model
            return self._models[level]

    def _compile(self, model: torch.nn.Module, options: CompileOptions) -> torch.nn.Module:
        """Compile a loaded model; families override to compile repeated blocks only."""
        return torch.compile(model, backend=options.backend, mode=options.mode, dynamic=False)

    def is_loaded(self, level: int) -> bool:
        """Whether the level's weights are resident."""
        return level in self._models

    @torch.inference_mode()
    def forward(self, level: int, batch: Any) -> LevelOutput:
        """Per-residue final-layer representations of one level for an encoded batch."""
        return self._forward(self.load(level), batch)

    def check_dim(self, level: int, actual: int) -> None:
        """Raise LevelMismatchError when a loaded model's width differs from the declared level."""
        lv = self.levels[level]
        if actual != lv.dim:
            raise LevelMismatchError(
                f"level {lv.name} ({lv.model_id}) produces {actual}-dim representations, "
                f"but {lv.dim} were expected (artifact metadata or --models mismatch)"
            )
