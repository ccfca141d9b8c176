"""Soak: the distributed service under mixed, checked load for a bounded time, with faults.

An API, two workers and a private redis-server (the shipped ACL users) run as real processes on
loopback; with the fault events (the default), a second API and two workers serve the next
artifact on the same Redis and prefix, a worker is killed and restarted under its id, and the
clients move to the new artifact's API mid-run while the old API drains.  N clients,
each on its own keep-alive connection, loop over request kinds drawn at random with a fixed seed
(pooled and per-residue, duplicates, cache hits, base64, .npy/.npz, invalid sequences and other
invalid requests), and every response is checked against its request: status, error param,
order and ``index``, residues, shapes, and values against embeddings computed once in-process by
the same Embedder the worker builds.  The RSS of every server process is sampled each second.

    python -m benchmarks.soak [--clients 50 --duration 60] [--no-events]   # or: benchmarks/run soak
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import redis

from app.http.encoding import NPY
from app.transport.keys import GROUP, text
from benchmarks import loadgen
from benchmarks.common import (
    CACHE,
    RESULTS,
    process_cpu_s,
    process_rss_mb,
    procs,
    save,
    tiny_esm2,
    uniref,
)
from benchmarks.service import pct, served_artifact
from models.artifact import Artifact, load_artifact, save_artifact
from models.sequences import LongSequencePolicy, Pooling

#: The first 20 % of the run is warm-up (same traffic): RSS growth is measured from its end.
WARMUP_FRACTION = 0.2
#: RSS "after warm-up" and "at the end" are medians of the samples in a window this long.
RSS_WINDOW_S = 3.0
#: Batch composition changes float32 summation order, and cached prefixes were computed in
#: other batches: differences up to ~4e-6 were seen (max_abs_err, max_err_over_tol in results).
RTOL = ATOL = 1e-5
#: A request with no answer this long after it was sent is lost: the service's own deadline
#: (RDSERVE_REQUEST_TIMEOUT_S, 120 s by default) promises a 504 well before.
CLIENT_TIMEOUT_S = 150.0
#: Pool sequences are 20–300 residues: nothing is truncated and per-residue bodies stay small.
MIN_LEN, MAX_LEN = 20, 300
HOT = 32  # "cache_hit" requests draw from the first HOT pool sequences only
#: Characters outside models.sequences.ALPHABET (lowercase letters would be case-folded into
#: residues, so they are not invalid).
BAD_CHARS = "J*-.0#ß"
UNKNOWN_FIELDS = ("temperature", "dimension", "pool", "max_tokens", "encoding")
MAX_FAILURES = 20  # examples kept in the results (the counts are complete)


@dataclass
class Pool:
    """Valid sequences and their full-k reference embeddings (computed once, in-process)."""

    seqs: list[str]
    refs: dict[str, list[np.ndarray]]  # pooling → (k_max,) or (L, k_max) per sequence
    art: Artifact

    def draw(self, rng: random.Random, pooling: str, n: int, hot: bool = False) -> list[int]:
        """n pool indices (repeats possible) that have a reference for this pooling."""
        hi = len(self.refs[pooling])
        hi = min(HOT, hi) if hot else hi
        return [rng.randrange(hi) for _ in range(n)]

    def want(self, i: int, pooling: str, k: int) -> np.ndarray:
        """The expected answer before any normalisation: the first k dims of the full one."""
        return self.refs[pooling][i][..., :k].astype(np.float64)


def build_pool(artifact: Path, size: int, per_residue: int, seed: int) -> Pool:
    """UniRef90 sample sequences and references from the worker's own code path.

    Mean-pooled references cover the whole pool (so cache misses go on all run long);
    per-residue and bos ones cover the first ``per_residue`` sequences (memory: L × k each).
    """
    import torch

    from app.bootstrap import make_embedder
    from app.settings import Settings

    seqs = [s for s in uniref(seed=seed) if MIN_LEN <= len(s) <= MAX_LEN][:size]
    art = load_artifact(artifact)
    embedder = make_embedder(Settings(artifact=artifact, device="cpu"), art)
    refs = {}
    # One thread: beside any other busy process, two OpenMP threads on two cores wait at every
    # barrier (1,000 sequences took 68 s with two, 12 s with one, on this shared machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for pooling, n in (
            (Pooling.mean, size),
            (Pooling.per_residue, per_residue),
            (Pooling.bos, per_residue),
        ):
            vecs, _ = embedder.embed(seqs[:n], art.max_dim, pooling, LongSequencePolicy.truncate)
            refs[str(pooling)] = vecs
    finally:
        torch.set_num_threads(threads)
    return Pool(seqs, refs, art)


@dataclass(slots=True)
class Req:
    """One request and what its answer must be."""

    kind: str
    body: dict[str, Any]
    items: list[int] = field(default_factory=list)  # pool index of each input (200s)
    status: int = 200
    param: str | None = None  # expected error.param
    code: str | None = None  # expected error.code (None: not checked)
    message: str | None = None  # expected part of error.message (None: not checked)
    npy: bool = False  # sent with Accept: application/x-npy
    raw: bytes | None = None  # the body as sent, when ``body`` cannot be (it is then a display)


def _messy(rng: random.Random, seq: str) -> str:
    """The same sequence as a client might paste it: lowercase, with whitespace inside."""
    s = seq.lower() if rng.random() < 0.5 else seq
    for _ in range(rng.randint(1, 3)):
        p = rng.randrange(len(s) + 1)
        s = s[:p] + rng.choice([" ", "\n", "\t", "\r\n"]) + s[p:]
    return s


def _embed(
    kind: str, rng: random.Random, pool: Pool, pooling: str, n_max: int, hot: bool = False
) -> Req:
    """A valid request of 1..n_max pool sequences with random k, form and options."""
    items = pool.draw(rng, pooling, rng.randint(1, n_max), hot)
    body: dict[str, Any] = {"input": [pool.seqs[i] for i in items]}
    if rng.random() < 0.9:  # else the default: the full k
        body["dimensions"] = rng.randint(1, pool.art.max_dim)
    if pooling != "mean" or rng.random() < 0.5:
        body["pooling"] = pooling
    if len(items) == 1 and rng.random() < 0.5:
        body["input"] = body["input"][0]  # a bare string
    if rng.random() < 0.25:
        body["normalize"] = True
    if rng.random() < 0.25:
        body["ids"] = [f"{kind}-{j}-{rng.randrange(10**6)}" for j in range(len(items))]
    if rng.random() < 0.1:  # naming the served model is accepted, by artifact or family
        body["model"] = rng.choice([pool.art.name, pool.art.family])
    return Req(kind, body, items)


def mean(rng: random.Random, pool: Pool) -> Req:
    return _embed("mean", rng, pool, "mean", 8)


def per_residue(rng: random.Random, pool: Pool) -> Req:
    return _embed("per_residue", rng, pool, "per_residue", 4)


def bos(rng: random.Random, pool: Pool) -> Req:
    return _embed("bos", rng, pool, "bos", 6)


def cache_hit(rng: random.Random, pool: Pool) -> Req:
    """Sequences every client repeats: after the first seconds, served from the cache."""
    return _embed("cache_hit", rng, pool, "mean", 8, hot=True)


def b64(rng: random.Random, pool: Pool) -> Req:
    req = _embed("base64", rng, pool, rng.choice(["mean", "per_residue"]), 4)
    req.body["encoding_format"] = "base64"
    return req


def npy(rng: random.Random, pool: Pool) -> Req:
    req = _embed("npy", rng, pool, rng.choice(["mean", "per_residue"]), 4)
    req.body.pop("normalize", None)
    req.npy = True
    return req


def duplicates(rng: random.Random, pool: Pool) -> Req:
    """The same sequences several times in one request, some of them lowercase/whitespaced."""
    pooling = rng.choice(["mean", "per_residue"])
    distinct = pool.draw(rng, pooling, rng.randint(1, 3))
    items = distinct + [rng.choice(distinct) for _ in range(rng.randint(1, 5))]
    rng.shuffle(items)
    inputs = [_messy(rng, pool.seqs[i]) if rng.random() < 0.3 else pool.seqs[i] for i in items]
    body = {"input": inputs, "dimensions": rng.randint(1, pool.art.max_dim), "pooling": pooling}
    return Req("duplicates", body, items)


def invalid_sequence(rng: random.Random, pool: Pool) -> Req:
    """One bad item at a random index i among valid ones: 400 naming exactly input[i]."""
    items = pool.draw(rng, "mean", rng.randint(1, 6))
    inputs: list[Any] = [pool.seqs[j] for j in items]
    i = rng.randrange(len(inputs))
    code: str | None = "invalid_sequence"
    r = rng.random()
    if r < 0.7:
        p, c = rng.randrange(len(inputs[i]) + 1), rng.choice(BAD_CHARS)
        inputs[i] = inputs[i][:p] + c + inputs[i][p:]
        message: str | None = f"input[{i}]: invalid residue {c!r} at position {p + 1}"
        if i + 1 < len(inputs) and rng.random() < 0.3:  # a later fault too: the first is named
            inputs[rng.randrange(i + 1, len(inputs))] = "MKVJ"
    elif r < 0.85:
        inputs[i] = rng.choice(["", " ", "\n\t "])
        message = f"input[{i}]: empty sequence"
    else:  # not a string: pydantic's type error, still naming the item
        inputs[i] = rng.choice([7, None, ["MKV"], {"seq": "MKV"}, 1.5, True])
        code, message = None, None
    body = {"input": inputs, "dimensions": rng.randint(1, pool.art.max_dim)}
    if rng.random() < 0.3:
        body["pooling"] = "per_residue"
    return Req(
        "invalid_sequence", body, status=400, param=f"input[{i}]", code=code, message=message
    )


def bad_dimensions(rng: random.Random, pool: Pool) -> Req:
    k = rng.choice([0, -rng.randint(1, 100), pool.art.max_dim + rng.randint(1, 1000)])
    body = {"input": [pool.seqs[i] for i in pool.draw(rng, "mean", 2)], "dimensions": k}
    code = "invalid_dimensions" if k > 0 else "greater_than_equal"
    return Req("bad_dimensions", body, status=400, param="dimensions", code=code)


def empty_input(rng: random.Random, pool: Pool) -> Req:
    body = {"input": [], "dimensions": rng.randint(1, pool.art.max_dim)}
    return Req("empty_input", body, status=400, param="input", code="empty_input")


def unknown_field(rng: random.Random, pool: Pool) -> Req:
    name = rng.choice(UNKNOWN_FIELDS)
    body = {"input": [pool.seqs[i] for i in pool.draw(rng, "mean", 2)], name: 1}
    return Req(
        "unknown_field",
        body,
        status=400,
        param=name,
        code="extra_forbidden",
        message=f"unknown field {name!r}",
    )


#: Ids that cannot name a result: lone surrogates (valid JSON, not UTF-8) and paths.
HOSTILE_IDS = ("\ud800", "a\udfffb", "../x", "/abs", "a//b", "x\\y", ".")


def hostile_id(rng: random.Random, pool: Pool) -> Req:
    """One id that is no name (issue 13 items 4 and 10): 400 naming exactly ids[i], no 5xx."""
    items = pool.draw(rng, "mean", rng.randint(1, 4))
    ids = [f"id{j}" for j in range(len(items))]
    i = rng.randrange(len(ids))
    ids[i] = rng.choice(HOSTILE_IDS)
    body = {"input": [pool.seqs[j] for j in items], "ids": ids, "dimensions": pool.art.max_dim}
    raw = json.dumps(body).encode()  # escapes a lone surrogate as \ud800: valid JSON
    shown = {**body, "ids": [ascii(x) for x in ids]}
    return Req("hostile_id", shown, status=400, param=f"ids[{i}]", code="invalid_id", raw=raw)


def loose_type(rng: random.Random, pool: Pool) -> Req:
    """A number or flag of the wrong JSON type ("32", true, 32.0, "true"): 400, never coerced."""
    field, value = rng.choice(
        [("dimensions", "32"), ("dimensions", True), ("dimensions", 32.0), ("normalize", "true")]
    )
    body = {"input": [pool.seqs[i] for i in pool.draw(rng, "mean", 2)], field: value}
    return Req("loose_type", body, status=400, param=field)


#: kind → (relative weight, request builder)
KINDS: dict[str, tuple[float, Callable[[random.Random, Pool], Req]]] = {
    "mean": (22, mean),
    "per_residue": (12, per_residue),
    "bos": (5, bos),
    "duplicates": (10, duplicates),
    "cache_hit": (14, cache_hit),
    "base64": (6, b64),
    "npy": (6, npy),
    "invalid_sequence": (13, invalid_sequence),
    "bad_dimensions": (4, bad_dimensions),
    "empty_input": (3, empty_input),
    "unknown_field": (5, unknown_field),
    "hostile_id": (3, hostile_id),
    "loose_type": (3, loose_type),
}


@dataclass(slots=True)
class Verdict:
    """What checking one response found."""

    problem: str | None = None  # why it does not answer its request (None: it does)
    level: int | None = None  # last chain level the request's k needs (200s)
    sequences: int = 0
    residues: int = 0
    tiers: list[str] = field(default_factory=list)
    max_abs_err: float = 0.0
    max_err_over_tol: float = 0.0  # worst |got − want| / (ATOL + RTOL·|want|); ≤ 1 passes


def _compare(got: np.ndarray, want: np.ndarray, normalize: bool, what: str, v: Verdict) -> None:
    """got vs want element-wise within ATOL + RTOL·|want|.

    A normalised answer must have unit norm and is compared at the reference's scale (times
    its norm): dividing by a small norm (k = 2, say) would amplify the float noise of batching
    past any fixed tolerance without anything being wrong.
    """
    if got.shape != want.shape:
        v.problem = f"{what}: shape {got.shape}, expected {want.shape}"
        return
    got = got.astype(np.float64)
    if normalize:
        norms = np.linalg.norm(got, axis=-1)
        if not np.all(np.abs(norms - 1) <= 1e-5):
            v.problem = f"{what}: normalize=true but norms span {norms.min()}–{norms.max()}"
            return
        got = got * np.linalg.norm(want, axis=-1, keepdims=True)
    err = np.abs(got - want)
    ratio = err / (ATOL + RTOL * np.abs(want))
    if not np.all(ratio <= 1):  # NaN fails too
        v.problem = f"{what}: values differ from the reference (max abs err {np.nanmax(err):.3g})"
        return
    v.max_abs_err = max(v.max_abs_err, float(err.max(initial=0.0)))
    v.max_err_over_tol = max(v.max_err_over_tol, float(ratio.max(initial=0.0)))


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}


def check(req: Req, status: int, headers: dict[str, str], payload: bytes, pool: Pool) -> Verdict:
    """Does this response answer this request?"""
    v = Verdict()
    if status != req.status:
        v.problem = f"status {status}, expected {req.status}: {payload[:300]!r}"
        return v
    if req.status != 200:
        err = orjson.loads(payload).get("error") or {}
        if set(err) != {"message", "type", "param", "code"}:
            v.problem = f"error shape: {sorted(err)}"
        elif err["param"] != req.param:
            v.problem = f"error.param {err['param']!r}, expected {req.param!r}"
        elif req.code is not None and err["code"] != req.code:
            v.problem = f"error.code {err['code']!r}, expected {req.code!r}"
        elif req.message is not None and req.message not in err["message"]:
            v.problem = f"error.message {err['message']!r} lacks {req.message!r}"
        return v
    b = req.body
    k = b.get("dimensions", pool.art.max_dim)
    pooling, ids = b.get("pooling", "mean"), b.get("ids")
    wants = [pool.want(i, pooling, k) for i in req.items]
    v.level = pool.art.level_for_dim(k)
    v.sequences, v.residues = len(req.items), sum(len(pool.seqs[i]) for i in req.items)
    if req.npy:
        _check_binary(headers, payload, wants, ids, k, v)
    else:
        _check_json(req, orjson.loads(payload), pool, wants, k, v)
    return v


def _check_json(
    req: Req, res: dict, pool: Pool, wants: list[np.ndarray], k: int, v: Verdict
) -> None:
    b, art = req.body, pool.art
    levels = [lv.name for lv in art.levels[: art.level_for_dim(k) + 1]]
    head = {
        "dimensions": k,
        "pooling": b.get("pooling", "mean"),
        "artifact_sha256": art.sha256,
        "model": art.name,
        "levels": levels,
        "usage": {"prompt_tokens": v.residues, "total_tokens": v.residues},
    }
    for key, want in head.items():
        if res.get(key) != want:
            v.problem = f"{key} {res.get(key)!r}, expected {want!r}"
            return
    data = res["data"]
    if len(data) != len(req.items):
        v.problem = f"{len(data)} items for {len(req.items)} inputs"
        return
    ids = b.get("ids") or [None] * len(data)
    for i, (item, pid, want) in enumerate(zip(data, req.items, wants, strict=True)):
        v.tiers.append(item["cache"])
        if item["index"] != i or item["id"] != ids[i]:
            v.problem = f"data[{i}]: index {item['index']}, id {item['id']!r}"
        elif item["residues"] != len(pool.seqs[pid]) or item["truncated"] or item["chunked"]:
            v.problem = f"data[{i}]: residues {item['residues']} for {len(pool.seqs[pid])}"
        elif item["cached"] != (item["cache"] == "full_hit"):
            v.problem = f"data[{i}]: cached {item['cached']} with cache {item['cache']!r}"
        if v.problem:
            return
        emb = item["embedding"]
        if b.get("encoding_format") == "base64":
            got = np.frombuffer(base64.b64decode(emb), "<f4")
            got = got.reshape(want.shape) if got.size == want.size else got
        else:
            got = np.asarray(emb, dtype=np.float64)
        _compare(got, want, b.get("normalize", False), f"data[{i}]", v)
        if v.problem:
            return


def _check_binary(
    headers: dict[str, str],
    payload: bytes,
    wants: list[np.ndarray],
    ids: list[str] | None,
    k: int,
    v: Verdict,
) -> None:
    v.tiers = headers.get("x-rdserve-cache", "").split(",")
    if headers.get("x-rdserve-dimensions") != str(k) or len(v.tiers) != len(wants):
        v.problem = f"headers: dimensions {headers.get('x-rdserve-dimensions')}, cache {v.tiers}"
        return
    if wants[0].ndim == 1:  # pooled: one .npy, N × k
        if headers.get("content-type") != NPY:
            v.problem = f"content-type {headers.get('content-type')}"
            return
        got = np.load(io.BytesIO(payload), allow_pickle=False)
        _compare(got, np.stack(wants), False, "npy", v)
        return
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:  # per residue: .npz by id
        names = ids or [str(i) for i in range(len(wants))]
        if sorted(z.files) != sorted(names):
            v.problem = f"npz keys {z.files}, expected {names}"
            return
        for name, want in zip(names, wants, strict=True):
            _compare(z[name], want, False, f"npz[{name}]", v)
            if v.problem:
                return


@dataclass
class KindStats:
    """Counts and latencies of one request kind."""

    requests: int = 0  # sent (answered or lost)
    statuses: Counter = field(default_factory=Counter)
    server_errors: int = 0  # 5xx
    lost: int = 0  # no complete response: timeout, connection error
    mismatched: int = 0  # answered, but not what the request asked for
    checked: int = 0  # answered and every check passed
    sequences: int = 0  # embeddings returned (200s)
    residues: int = 0
    tiers: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    max_abs_err: float = 0.0
    max_err_over_tol: float = 0.0


class Stats:
    """Every outcome, by kind, plus a few failure examples to reproduce from."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.kinds = {name: KindStats() for name in KINDS}
        self.failures: list[dict[str, Any]] = []
        self.per_second: Counter = Counter()  # completions per second of the run
        # Latency of answers that ran a model, by the last level their k needs: does work for a
        # large k wait behind the small-k work the worker runs first?
        self.computed_by_level: dict[int, list[float]] = {}

    def _example(self, req: Req, rid: str, what: str, status: int | None, payload: bytes) -> None:
        if len(self.failures) < MAX_FAILURES:
            body = orjson.loads(orjson.dumps(req.body))
            if isinstance(body.get("input"), list):  # keep the example short
                body["input"] = [s[:60] if isinstance(s, str) else s for s in body["input"]]
            self.failures.append(
                {
                    "kind": req.kind,
                    "request_id": rid,
                    "status": status,
                    "problem": what,
                    "request": body,
                    "npy": req.npy,
                    "response": payload[:500].decode("utf-8", "replace"),
                }
            )

    def lost(self, req: Req, rid: str, exc: BaseException) -> None:
        s = self.kinds[req.kind]
        s.requests += 1
        s.lost += 1
        self._example(req, rid, f"lost: {exc!r}", None, b"")

    def record(
        self, req: Req, rid: str, status: int, payload: bytes, latency: float, v: Verdict
    ) -> None:
        s = self.kinds[req.kind]
        s.requests += 1
        s.statuses[status] += 1
        s.latencies.append(latency)
        self.per_second[int(time.perf_counter() - self.t0)] += 1
        if status >= 500:
            s.server_errors += 1
            self._example(req, rid, "5xx", status, payload)
        elif v.problem is not None:
            s.mismatched += 1
            self._example(req, rid, v.problem, status, payload)
        else:
            s.checked += 1
            s.sequences += v.sequences
            s.residues += v.residues
            s.tiers.update(v.tiers)
            if v.level is not None and any(t != "full_hit" for t in v.tiers):
                self.computed_by_level.setdefault(v.level, []).append(latency)
            s.max_abs_err = max(s.max_abs_err, v.max_abs_err)
            s.max_err_over_tol = max(s.max_err_over_tol, v.max_err_over_tol)


@dataclass
class Target:
    """Where clients send now: an API's endpoint and the pool its answers are checked against
    (a rolling change of artifact moves every client to the new API; ``version`` counts moves)."""

    url: str
    pool: Pool
    version: int = 0

    def move(self, url: str, pool: Pool) -> None:
        self.url, self.pool, self.version = url, pool, self.version + 1


async def client(idx: int, target: Target, stats: Stats, deadline: float, seed: int) -> None:
    """One closed-loop client on its own keep-alive connection, reconnecting after a failure
    and when the target moves (as a load balancer drains the old API)."""
    rng = random.Random(seed * 1_000_003 + idx)
    names, weights = list(KINDS), [w for w, _ in KINDS.values()]
    conn: loadgen.Connection | None = None
    version = target.version
    n = 0
    while time.perf_counter() < deadline:
        if target.version != version and conn is not None:
            conn.close()
            conn = None
        version, url, pool = target.version, target.url, target.pool
        # Client i opens with kind i: with at least as many clients as kinds, every kind is
        # sent (and checked) even in a short run; then kinds are drawn by weight.
        kind = names[idx % len(names)] if n == 0 else rng.choices(names, weights)[0]
        req = KINDS[kind][1](rng, pool)
        rid = f"soak-{idx}-{n}"  # echoed in X-Request-ID: ties each response to its request
        n += 1
        headers = {"X-Request-ID": rid, **({"Accept": NPY} if req.npy else {})}
        wire = loadgen.encode_post(url, req.raw or req.body, headers)
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = await loadgen.Connection.open(url)
            status, head, payload = await asyncio.wait_for(conn.exchange(wire), CLIENT_TIMEOUT_S)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            stats.lost(req, rid, e)
            if conn is not None:
                conn.close()
                conn = None
            await asyncio.sleep(0.1)  # a dead server must not turn this into a busy loop
            continue
        latency = time.perf_counter() - t0
        h = _headers(head)
        try:
            verdict = check(req, status, h, payload, pool)
        except Exception as e:  # noqa: BLE001 — an unparsable answer is a mismatch, not a crash
            verdict = Verdict(problem=f"unreadable response: {e!r}")
        if verdict.problem is None and h.get("x-request-id") != rid:
            verdict.problem = f"x-request-id {h.get('x-request-id')!r}, expected {rid!r}"
        stats.record(req, rid, status, payload, latency, verdict)
        if h.get("connection", "").lower() == "close":
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


class RssSampler(threading.Thread):
    """VmRSS and CPU time of each process (and Redis's used_memory) once a second, in a thread of
    its own so a busy event loop cannot delay the samples. Processes may join (``add``) and
    leave (they stop being sampled once gone)."""

    def __init__(self, pids: dict[str, int], redis: Any, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pids, self.period = dict(pids), period
        self.redis = redis
        self.samples: list[tuple[float, dict[str, float | None]]] = []
        self.cpu: dict[str, float] = {}  # last CPU seconds seen per process
        self.t0 = time.perf_counter()
        self._done = threading.Event()
        self._lock = threading.Lock()

    def add(self, name: str, pid: int) -> None:
        with self._lock:
            self.pids[name] = pid

    def sample(self) -> dict[str, float | None]:
        with self._lock:
            pids = dict(self.pids)
        out = {name: process_rss_mb(pid) for name, pid in pids.items()}
        for name, pid in pids.items():
            with contextlib.suppress(OSError):
                self.cpu[name] = process_cpu_s(pid)
        try:
            out["redis_used_memory"] = self.redis.info("memory")["used_memory"] / 2**20
        except redis.RedisError:
            out["redis_used_memory"] = None
        return out

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append((time.perf_counter() - self.t0, self.sample()))
            self._done.wait(self.period)

    def stop(self) -> None:
        self._done.set()
        self.join()


def rss_summary(
    samples: list[tuple[float, dict[str, float | None]]],
    idle: dict[str, float | None],
    warm_t: float,
) -> dict[str, dict[str, float | None]]:
    """Per process: idle (before load), after warm-up and at its end (its last samples: the
    run's, or before it stopped), as window medians; growth between them. A process started
    during the run (a restarted worker) was loading at its first samples: no growth for it."""
    out = {}
    names = list(dict.fromkeys(n for _, smp in samples for n in smp))
    for name in names:
        series = [(t, s[name]) for t, s in samples if s.get(name) is not None]
        if not series:
            continue

        def window(t1: float, series: list = series) -> float | None:
            vals = [x for t, x in series if t1 - RSS_WINDOW_S <= t <= t1]
            return statistics.median(vals) if vals else None

        from_start = series[0][0] <= 1.0  # else started during the run
        warm, end = (window(warm_t) if from_start else None), window(series[-1][0])
        after = [(t, x) for t, x in series if t >= (warm_t if from_start else series[0][0])]
        slope = None
        if warm is not None and len(after) >= 3:
            slope = float(np.polyfit([t for t, _ in after], [x for _, x in after], 1)[0]) * 60
        out[name] = {
            "idle_mb": idle.get(name),
            "after_warmup_mb": warm,
            "end_mb": end,
            "alive_s": [round(series[0][0], 1), round(series[-1][0], 1)],
            "peak_after_warmup_mb": max((x for _, x in after), default=None),
            "growth_pct": 100 * (end - warm) / warm if warm and end else None,
            "slope_mb_per_min": slope,
        }
    return out


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (Linux /proc/stat; idle and iowait excluded)."""
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, fh.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


#: API counters worth reading after a run: error responses by code (the 400s included), cache
#: failures, worker replies nobody waited for, jobs queued again after a Redis restart.
API_COUNTERS = (
    "rdserve_errors",
    "rdserve_cache_errors",
    "rdserve_replies_discarded",
    "rdserve_tasks_resubmitted",
)


def api_counters(base: str) -> dict[str, float]:
    """The API_COUNTERS samples of the API's /metrics, as 'name{label=value}' → value."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        if fam.name not in API_COUNTERS:
            continue
        for smp in fam.samples:
            if smp.name.endswith("_total"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
                out[f"{smp.name}{{{labels}}}" if labels else smp.name] = smp.value
    return out


def _log_errors(proc: procs.Proc) -> list[str]:
    """error/critical lines of a process's JSON log (tracebacks of crashes included)."""
    lines = proc.output().splitlines()
    return [
        ln[:500]
        for ln in lines
        if '"level":"error"' in ln or '"level":"critical"' in ln or ln.startswith("Traceback")
    ]


#: Fault events, at these fractions of the load's duration.
RESTART_AT = 0.35  # SIGKILL worker a1, start it again at once under the same --worker-id
CHANGE_AT = 0.6  # rolling change of artifact: clients move to API B, API A drains, a1 a2 stop
#: How long after moving the clients the old API gets its SIGTERM (a load balancer's drain).
MOVE_GRACE_S = 0.5


class Fleet:
    """The processes of a run: a private Redis with the shipped ACL users (or an external one),
    API A with workers a1, a2 (the first artifact) and, for a change of artifact, API B with
    b1, b2 (the next), on one Redis and prefix. Logs under ``logs``."""

    def __init__(self, logs: Path, redis_url: str | None) -> None:
        from tests.harness import SecuredRedis, cluster_env

        self.logs, self.prefix = logs, f"rdserve-soak-{uuid.uuid4().hex[:8]}"
        # A private Redis by default: other test runs share 127.0.0.1:6379 (their load and any
        # restart or flush would land in this measurement), and stopping it leaves nothing.
        self.private = SecuredRedis(logs, self.prefix).start() if redis_url is None else None
        self.url = self.private.url if self.private is not None else redis_url
        assert self.url is not None
        self.redis = self.private.client() if self.private else redis.Redis.from_url(self.url)
        self._env = cluster_env
        self.clusters: dict[str, Any] = {}
        self.stopped: dict[str, int] = {}  # processes stopped on purpose → exit status

    def start(self, name: str, artifact: Path, workers: int) -> Any:
        """API ``name`` and its workers (<name>1, <name>2, …), serving ``artifact``."""
        from tests.harness import Cluster

        env = self._env(
            self.url,
            artifact,
            self.prefix,
            RDSERVE_LOG_LEVEL="warning",
            RDSERVE_MAX_QUEUE="4096",
            RDSERVE_HEARTBEAT_S="2",  # the default: a dead worker is noticed after 6 s
        )
        (self.logs / name).mkdir(exist_ok=True)
        roles = self.private.role_env if self.private is not None else None
        c = Cluster(env, self.logs / name, roles)
        for i in range(workers):
            c.worker(f"{name}{i + 1}")
        self.clusters[name] = c
        return c

    def processes(self) -> dict[str, procs.Proc]:
        out = {}
        for name, c in self.clusters.items():
            out[f"api-{name}"] = c.api
            out.update(c.workers)
        return out

    def close(self) -> None:
        for c in self.clusters.values():
            c.close()
        self.redis.close()
        if self.private is not None:
            self.private.stop()
        else:
            procs.clear_prefix(self.url, self.prefix)


def run_events(
    fleet: Fleet,
    target: Target,
    pool_b: Pool,
    t0: float,
    duration: float,
    sampler: RssSampler,
    events: list[dict[str, Any]],
) -> None:
    """The fault events of a run, at their times (a thread beside the load)."""

    def at(fraction: float) -> None:
        time.sleep(max(0.0, t0 + fraction * duration - time.perf_counter()))

    def note(event: str, **extra: Any) -> None:
        events.append({"t": round(time.perf_counter() - t0, 2), "event": event, **extra})

    a, b = fleet.clusters["a"], fleet.clusters["b"]
    at(RESTART_AT)
    old = a.workers["a1"]
    fleet.stopped["a1 (killed)"] = -signal.SIGKILL
    new = a.restart_worker("a1")
    sampler.add("a1 (restarted)", new.p.pid)
    note("SIGKILL a1, restarted at once under the same worker id", old_pid=old.p.pid)
    at(CHANGE_AT)
    target.move(f"{b.base}/v1/embeddings", pool_b)
    note("clients moved to API b (artifact b)")
    time.sleep(MOVE_GRACE_S)
    counters = api_counters(a.base)
    a.api.signal(signal.SIGTERM)
    fleet.stopped["api-a"] = a.api.wait(60)
    note("API a stopped (SIGTERM, drained)", exit=fleet.stopped["api-a"], api_counters=counters)
    for name in ("a1", "a2"):
        a.workers[name].signal(signal.SIGTERM)
    for name in ("a1", "a2"):
        fleet.stopped[name] = a.workers[name].wait(60)
    note("workers a1, a2 stopped (SIGTERM)", exits=[fleet.stopped["a1"], fleet.stopped["a2"]])


def soak(
    artifact: Path,
    clients: int = 50,
    duration: float = 60.0,
    seed: int = 0,
    pool_size: int = 4000,
    per_residue_pool: int = 600,
    logs: Path | None = None,
    redis_url: str | None = None,
    next_artifact: Path | None = None,
    next_workers: int = 2,
) -> dict[str, Any]:
    """Start Redis (a private one unless redis_url), API a and workers a1, a2; load; tear down.

    With ``next_artifact``, the fault events run too: API b and workers b1 … (``next_workers``)
    serving it start
    before the load (on the same Redis and prefix, idle beside a's); at RESTART_AT worker a1 is
    killed and restarted under the same id; at CHANGE_AT the clients move to API b, API a
    drains and a's workers stop — every answer checked against its own artifact's references.

    Returns counts by kind and status, failure examples, latencies, throughput, RSS, the
    events, and the state of the processes, their logs and the task streams after the load.
    """
    logs = logs or CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t_setup = time.perf_counter()
    per_residue_pool = min(per_residue_pool, pool_size)
    pool = build_pool(artifact, pool_size, per_residue_pool, seed)
    pool_b = build_pool(next_artifact, pool_size, per_residue_pool, seed) if next_artifact else None
    fleet = Fleet(logs, redis_url)
    events: list[dict[str, Any]] = []
    try:
        fleet.start("a", artifact, 2)
        if next_artifact is not None:
            fleet.start("b", next_artifact, next_workers)
        for c in fleet.clusters.values():
            c.wait_workers(len(c.workers), timeout=300)
        pids = {name: p.p.pid for name, p in fleet.processes().items()}
        if fleet.private is not None and fleet.private.proc is not None:
            pids["redis"] = fleet.private.proc.pid
        info: dict[str, Any] = {"setup_s": time.perf_counter() - t_setup}
        sampler = RssSampler(pids, fleet.redis)
        idle = sampler.sample()
        client0, busy0 = time.process_time(), machine_busy_s()
        redis_cpu0 = _redis_cpu(fleet.redis)
        cpu0 = dict(sampler.cpu)
        stats = Stats(time.perf_counter())
        sampler.t0 = stats.t0
        sampler.start()
        target = Target(f"{fleet.clusters['a'].base}/v1/embeddings", pool)
        faults = None
        if pool_b is not None:
            faults = threading.Thread(
                target=run_events,
                args=(fleet, target, pool_b, stats.t0, duration, sampler, events),
                daemon=True,
            )
            faults.start()

        async def load() -> None:
            deadline = stats.t0 + duration
            await asyncio.gather(
                *(client(i, target, stats, deadline, seed) for i in range(clients))
            )

        try:
            with loadgen.frozen_heap():
                asyncio.run(load())
        finally:
            if faults is not None:
                faults.join(120)
            sampler.stop()
        wall = time.perf_counter() - stats.t0
        cpu = {n: v - cpu0.get(n, 0.0) for n, v in sampler.cpu.items()}
        cpu["redis"] = _redis_cpu(fleet.redis) - redis_cpu0
        cpu["client"] = time.process_time() - client0
        # CPU that anything else on the machine took from these two cores: the context of every
        # timing here (a busy neighbour slows the worker's forward a lot, docs/performance.md).
        cpu["other processes"] = max(0.0, machine_busy_s() - busy0 - sum(cpu.values()))
        info["cpu_s"] = cpu
        info["events"] = events
        running = fleet.processes()
        info["crashed"] = {
            name: p.p.returncode
            for name, p in running.items()
            if not p.alive() and name not in fleet.stopped
        }
        info["stopped"] = fleet.stopped
        last = fleet.clusters["b" if pool_b is not None else "a"]
        if last.api.alive():
            info["ready_after"] = httpx.get(f"{last.base}/health/ready", timeout=10).status_code
            info["api_counters"] = api_counters(last.base)
        info["task_streams_after"] = {
            text(k): {
                "length": fleet.redis.xlen(k),
                "pending": fleet.redis.xpending(k, GROUP)["pending"],
            }
            for k in fleet.redis.scan_iter(match=f"{fleet.prefix}:*:tasks")
        }
        started = [p for c in fleet.clusters.values() for p in c.started]
        info["log_errors"] = {
            p.log.relative_to(logs).as_posix(): _log_errors(p)
            for p in [*(c.api for c in fleet.clusters.values()), *started]
        }
    finally:
        fleet.close()
    info["rss"] = rss_summary(sampler.samples, idle, WARMUP_FRACTION * duration)
    info["rss_samples"] = [[round(t, 2), s] for t, s in sampler.samples]
    return summarise(stats, wall, clients, duration, seed, pool, fleet.private is not None, info)


def _redis_cpu(r: Any) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def summarise(
    stats: Stats,
    wall: float,
    clients: int,
    duration: float,
    seed: int,
    pool: Pool,
    private_redis: bool,
    info: dict[str, Any],
) -> dict[str, Any]:
    kinds = {}
    for name, s in stats.kinds.items():
        kinds[name] = {
            "requests": s.requests,
            "statuses": {str(k): v for k, v in sorted(s.statuses.items())},
            "5xx": s.server_errors,
            "lost": s.lost,
            "mismatched": s.mismatched,
            "checked": s.checked,
            "sequences": s.sequences,
            "residues": s.residues,
            "cache": dict(s.tiers),
            "max_abs_err": s.max_abs_err,
            "max_err_over_tol": s.max_err_over_tol,
            "latency": pct(s.latencies) if s.latencies else None,
        }
    every = [x for s in stats.kinds.values() for x in s.latencies]
    statuses: Counter = Counter()
    for s in stats.kinds.values():
        statuses.update(s.statuses)
    totals = {
        key: sum(k[key] for k in kinds.values())
        for key in ("requests", "5xx", "lost", "mismatched", "checked", "sequences", "residues")
    }
    totals["statuses"] = {str(k): v for k, v in sorted(statuses.items())}
    totals["requests_per_s"] = totals["requests"] / wall
    totals["sequences_per_s"] = totals["sequences"] / wall
    totals["residues_per_s"] = totals["residues"] / wall
    totals["latency"] = pct(every) if every else None
    totals["max_abs_err"] = max(k["max_abs_err"] for k in kinds.values())
    totals["max_err_over_tol"] = max(k["max_err_over_tol"] for k in kinds.values())
    last = int(wall)
    return {
        "config": {
            "clients": clients,
            "duration_s": duration,
            "seed": seed,
            "pool": len(pool.seqs),
            "per_residue_pool": len(pool.refs["per_residue"]),
            "chain": pool.art.name,
            "levels": [lv.name for lv in pool.art.levels],
            "max_dimensions": pool.art.max_dim,
            "redis": "private redis-server" if private_redis else "external (own prefix)",
            "warmup_s": WARMUP_FRACTION * duration,
            "rss_window_s": RSS_WINDOW_S,
            "tolerance": {"rtol": RTOL, "atol": ATOL},
            "kinds": {n: w for n, (w, _) in KINDS.items()},
        },
        "load_s": wall,  # first request to last answer (the suite's wall_s includes set-up)
        "totals": totals,
        "kinds": kinds,
        "failures": stats.failures,
        "computed_latency_by_level": {
            str(lv): pct(lat) for lv, lat in sorted(stats.computed_by_level.items())
        },
        "completions_per_second": [stats.per_second.get(i, 0) for i in range(last + 1)],
        **info,
    }


def default_artifact() -> Path:
    """The service benchmark's tiny chain (see run())."""
    return served_artifact([str(tiny_esm2(h)) for h in (32, 48, 64)])[2]


def next_artifact(artifact: Path) -> Path:
    """Another artifact of the same chain (OLS on other sequences, so other values): what a
    change of artifact serves next (fitted once, kept beside the first)."""
    from models.families import build_chain
    from models.fit import fit_artifact
    from models.rd import Regressor

    path = artifact.with_name(f"{artifact.stem}-next.safetensors")
    if not path.exists():
        art = load_artifact(artifact)
        family = build_chain(art.family, levels=list(art.levels), device="cpu")
        save_artifact(fit_artifact(family, uniref(40, max_len=400, seed=7), Regressor.ols), path)
    return path


def run(
    clients: int = 50,
    duration: float = 60.0,
    seed: int = 0,
    pool_size: int = 4000,
    quick: bool = False,
) -> dict[str, Any]:
    """The soak, with its fault events, on the service benchmark's tiny chain (32 → 48 → 64,
    random weights).

    Tiny on purpose: it exercises the service, not the model — at ~5 ms of compute per request
    the run makes thousands of requests through validation, cache, queue and reply routing,
    where the 8M → 35M chain would make a few hundred in the same minute.
    """
    art = default_artifact()
    return soak(art, clients, duration, seed, pool_size, next_artifact=next_artifact(art))


QUICK = {"clients": 8, "duration": 5.0, "pool_size": 200}


def _ms(lat: dict[str, float] | None) -> str:
    if not lat:
        return "– | – | – | –"
    return " | ".join(f"{lat[k]:.0f}" for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def markdown(res: dict[str, Any]) -> str:
    c, t = res["config"], res["totals"]
    crashed = ", ".join(f"{n} (exit {rc})" for n, rc in res["crashed"].items()) or "none"
    fleet = "APIs a, b + workers a1, a2, b1, b2" if res["events"] else "API + 2 workers"
    lines = [
        f"**Soak** — distributed: {fleet} + {c['redis']}, chain {c['chain']} "
        f"(max k {c['max_dimensions']}), {c['clients']} clients × {c['duration_s']:g} s, "
        f"seed {c['seed']}, {c['pool']} pool sequences",
        "",
        *(f"- t = {e['t']:.1f} s: {e['event']}" for e in res["events"]),
        "",
        "| requests | statuses | 5xx | lost | mismatched | requests/s | sequences/s | residues/s | crashed |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {t['requests']:,} | {', '.join(f'{k}: {v:,}' for k, v in t['statuses'].items())} | "
        f"{t['5xx']} | {t['lost']} | {t['mismatched']} | {t['requests_per_s']:.0f} | "
        f"{t['sequences_per_s']:.0f} | {t['residues_per_s']:,.0f} | {crashed} |",
        "",
        "| kind | requests | statuses | checked | cache (full/partial/miss) | p50 | p95 | p99 | max ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, k in res["kinds"].items():
        tiers = k["cache"]
        cache = "/".join(str(tiers.get(x, 0)) for x in ("full_hit", "partial", "miss"))
        lines.append(
            f"| {name} | {k['requests']:,} | {', '.join(f'{s}: {n:,}' for s, n in k['statuses'].items())} | "
            f"{k['checked']:,} | {cache if tiers else '–'} | {_ms(k['latency'])} |"
        )
    lines.append(f"| **all** | {t['requests']:,} | | {t['checked']:,} | | {_ms(t['latency'])} |")
    lines += [
        "",
        f"RSS (MB; after warm-up = median of the {c['rss_window_s']:g} s before "
        f"{c['warmup_s']:g} s, end = of the last {c['rss_window_s']:g} s; Redis grows by design: "
        "it holds the cache):",
        "",
        "| process | idle | after warm-up | end | growth | peak after warm-up | slope MB/min |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res["rss"].items():
        growth = "–" if r["growth_pct"] is None else f"{r['growth_pct']:+.1f} %"
        slope = "–" if r["slope_mb_per_min"] is None else f"{r['slope_mb_per_min']:+.2f}"
        label = "redis (INFO used_memory)" if name == "redis_used_memory" else name
        lines.append(
            f"| {label} | {_mb(r['idle_mb'])} | {_mb(r['after_warmup_mb'])} | {_mb(r['end_mb'])} | "
            f"{growth} | {_mb(r['peak_after_warmup_mb'])} | {slope} |"
        )
    errs = {n: len(v) for n, v in res["log_errors"].items()}
    lines += [
        "",
        "Answers that ran a model, p50 / p99 ms by the last level their k needs: "
        + ", ".join(
            f"{c['levels'][int(lv)]} {x['p50_ms']:.0f} / {x['p99_ms']:.0f} (n {x['n']})"
            for lv, x in res["computed_latency_by_level"].items()
        )
        + ".",
        f"Values: worst |error| {t['max_abs_err']:.2g}, worst error / tolerance "
        f"{t['max_err_over_tol']:.2f} (tolerance {ATOL:g} + {RTOL:g}·|reference|).",
        "API counters after the run: "
        + (", ".join(f"{n} {v:g}" for n, v in res.get("api_counters", {}).items()) or "–")
        + ".",
        f"Task streams after the run: {res['task_streams_after']}; error log lines: {errs}; "
        f"/health/ready after: {res.get('ready_after')}; CPU s: "
        + ", ".join(f"{n} {v:.1f}" for n, v in res["cpu_s"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=4000, help="distinct valid sequences")
    ap.add_argument("--artifact", type=Path, help="default: the service benchmark's tiny chain")
    ap.add_argument(
        "--redis-url", help="an existing Redis (own key prefix) instead of a private one"
    )
    ap.add_argument(
        "--no-events", action="store_true", help="no worker restart, no change of artifact"
    )
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    art = args.artifact or default_artifact()
    res = soak(
        art,
        args.clients,
        args.duration,
        args.seed,
        args.pool,
        redis_url=args.redis_url,
        next_artifact=None if args.no_events else next_artifact(art),
    )
    cmd = "python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    path = save("soak", res, cmd.strip(), args.results_dir)
    print(markdown(res) + f"\n\n_{path.name}_")
    t = res["totals"]
    return 1 if t["5xx"] or t["lost"] or t["mismatched"] or res["crashed"] else 0


if __name__ == "__main__":
    sys.exit(main())
