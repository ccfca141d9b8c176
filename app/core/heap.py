"""Keeping the garbage collector off the request path."""

from __future__ import annotations

import gc


def freeze_heap() -> None:
    """Move every object alive now (models, libraries) out of the garbage collector's reach.

    With torch and transformers loaded a full collection walks ~400k objects and takes ~200 ms
    on this CPU; one landing inside a request showed up as a 130 ms p99 on cache hits.  Frozen
    objects are never scanned again, so later collections only see per-request garbage.
    """
    gc.collect()
    gc.freeze()
