"""Response bodies: JSON (float lists or base64) and binary .npy / .npz."""

from __future__ import annotations

import base64
import io

import orjson
from starlette.responses import Response

from app.core.service import Outcome
from app.http.schemas import EmbeddingRequest
from models.artifact import Artifact
from models.formats import write_npy, write_npz
from models.sequences import Handling, Pooling

NPY = "application/x-npy"
NPZ = "application/x-npz"


def wants_npy(accept: str | None) -> bool:
    """True when the client asked for a binary array body."""
    return bool(accept) and NPY in accept  # type: ignore[operator]


def json_body(req: EmbeddingRequest, out: Outcome, art: Artifact) -> Response:
    """OpenAI-shaped JSON with provenance; float32 numbers serialised by orjson."""
    ids = req.ids or [None] * len(out.items)
    data = []
    for i, (it, id_) in enumerate(zip(out.items, ids, strict=True)):
        if req.encoding_format == "base64":
            emb: object = base64.b64encode(it.vector.astype("<f4").tobytes()).decode()
        else:
            emb = it.vector
        data.append(
            {
                "object": "embedding",
                "index": i,
                "embedding": emb,
                "id": id_,
                "truncated": it.handling == Handling.truncated,
                "chunked": it.handling == Handling.chunked,
                "cached": it.tier == "full_hit",
                "cache": it.tier,
                "residues": it.residues,
            }
        )
    residues = sum(it.residues for it in out.items)
    body = {
        "object": "list",
        "model": art.name,
        "family": art.family,
        "levels": [lv.name for lv in art.levels[: out.stop + 1]],
        "artifact_sha256": art.sha256,
        "dimensions": out.k,
        "pooling": req.pooling.value,
        "data": data,
        "usage": {"prompt_tokens": residues, "total_tokens": residues},
    }
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
    )


def binary_body(req: EmbeddingRequest, out: Outcome, art: Artifact) -> Response:
    """.npy (N×k) for pooled output, .npz keyed by id (or index) for per-residue output."""
    buf = io.BytesIO()
    if req.pooling == Pooling.per_residue:
        names = req.ids or [str(i) for i in range(len(out.items))]
        write_npz(buf, {n: it.vector for n, it in zip(names, out.items, strict=True)}, req.dtype)
        media, ext = NPZ, "npz"
    else:
        write_npy(buf, [it.vector for it in out.items], req.dtype)
        media, ext = NPY, "npy"
    headers = {
        "X-Rdserve-Model": art.name,
        "X-Rdserve-Dimensions": str(out.k),
        "X-Rdserve-Levels": ",".join(lv.name for lv in art.levels[: out.stop + 1]),
        "X-Rdserve-Artifact-Sha256": art.sha256,
        "X-Rdserve-Cache": ",".join(it.tier for it in out.items),
        "X-Rdserve-Truncated": ",".join(
            str(int(it.handling == Handling.truncated)) for it in out.items
        ),
        "Content-Disposition": f'attachment; filename="embeddings.{ext}"',
    }
    return Response(buf.getvalue(), media_type=media, headers=headers)
