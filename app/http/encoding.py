"""Response bodies: JSON (float lists or base64) and binary .npy / .npz, chosen by Accept."""

from __future__ import annotations

import base64
import io

import orjson
from starlette.responses import Response, StreamingResponse

from app.core.service import Outcome
from app.http.schemas import EmbeddingRequest
from models.artifact import Artifact
from models.formats import iter_npy, iter_npz, write_npy, write_npz
from models.sequences import Handling, Pooling

JSON = "application/json"
NPY = "application/x-npy"
NPZ = "application/x-npz"
#: Binary bodies larger than this stream in pieces instead of being built whole.
STREAM_ABOVE = 2**20
#: Bytes per returned number: JSON floats (orjson's shortest round-trip float32 text plus a
#: comma, ~10–13), base64 of float32, and binary by dtype.
JSON_FLOAT_BYTES = 12.0
BASE64_BYTES = 4 * 4 / 3


def _media_ranges(accept: str) -> list[tuple[str, float]]:
    """(media range, q) pairs of an Accept header (RFC 9110 §12.5.1), case-insensitive."""
    out = []
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        if not media:
            continue
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 0.0  # a malformed weight accepts nothing
        out.append((media, q))
    return out


def _quality(media: str, ranges: list[tuple[str, float]]) -> float:
    """The q the client gives ``media``: from its most specific matching range (0: none)."""
    kind = media.split("/")[0]
    best, specificity = 0.0, -1
    for rng, q in ranges:
        spec = 2 if rng == media else 1 if rng == f"{kind}/*" else 0 if rng == "*/*" else -1
        if spec > specificity:
            best, specificity = q, spec
    return best


def wants_binary(accept: str | None) -> bool:
    """True when the client prefers .npy/.npz to JSON (ties and no Accept: JSON)."""
    if not accept:
        return False
    ranges = _media_ranges(accept)
    binary = max(_quality(NPY, ranges), _quality(NPZ, ranges))
    return binary > 0 and binary > _quality(JSON, ranges)


def value_bytes(req: EmbeddingRequest, binary: bool) -> tuple[float, str]:
    """Bytes per returned number in the chosen encoding, and its name (for the size limit)."""
    if binary:
        return (2.0 if req.dtype == "float16" else 4.0), f"binary {req.dtype}"
    if req.encoding_format == "base64":
        return BASE64_BYTES, "base64 float32"
    return JSON_FLOAT_BYTES, "JSON floats"


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
                "shape": list(it.vector.shape),
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
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type=JSON)


def binary_body(req: EmbeddingRequest, out: Outcome, art: Artifact) -> Response:
    """.npy (N×k) for pooled output, .npz keyed by id (or index) for per-residue output;
    streamed in pieces when large."""
    per_residue = req.pooling == Pooling.per_residue
    size = sum(it.vector.size for it in out.items) * (2 if req.dtype == "float16" else 4)
    ext = "npz" if per_residue else "npy"
    headers = {
        "X-Rdserve-Model": art.name,
        "X-Rdserve-Family": art.family,
        "X-Rdserve-Dimensions": str(out.k),
        "X-Rdserve-Levels": ",".join(lv.name for lv in art.levels[: out.stop + 1]),
        "X-Rdserve-Artifact-Sha256": art.sha256,
        "X-Rdserve-Cache": ",".join(it.tier for it in out.items),
        "X-Rdserve-Truncated": ",".join(
            str(int(it.handling == Handling.truncated)) for it in out.items
        ),
        "Content-Disposition": f'attachment; filename="embeddings.{ext}"',
    }
    media = NPZ if per_residue else NPY
    vectors = [it.vector for it in out.items]
    names = req.ids or [str(i) for i in range(len(vectors))]
    if size > STREAM_ABOVE:
        chunks = (
            iter_npz(zip(names, vectors, strict=True), req.dtype)
            if per_residue
            else iter_npy(vectors, req.dtype)
        )
        return StreamingResponse(chunks, media_type=media, headers=headers)
    buf = io.BytesIO()
    if per_residue:
        write_npz(buf, dict(zip(names, vectors, strict=True)), req.dtype)
    else:
        write_npy(buf, vectors, req.dtype)
    return Response(buf.getvalue(), media_type=media, headers=headers)
