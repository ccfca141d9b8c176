"""Capacity model of a distributed fleet (docs/scaling.md): measured where it can be, simulated
where it cannot.

Inputs, all measured: ``benchmarks/results/gpu.json`` (residues/s per ESM-2 level on an H100)
and ``benchmarks/results/redis_ops.json`` (Redis operations and CPU per request, API CPU per
request, cache bytes per sequence, the cost of the commands that grow with the fleet; from
``python -m benchmarks.redis_ops``). Outputs: GPUs for a target load, Redis memory for a cache,
the worker's termination grace period, and a discrete-event simulation (simpy) of 10, 100 and
1,000 GPU workers behind API replicas and one queue Redis: where the first bottleneck appears,
and the same fleet with it removed.

    python -m benchmarks.capacity [--quick]   # results/capacity.json, docs/scaling-*.png, tables

Model (one request = S sequences of 300 residues; a fraction of them cache misses):

* queue Redis, one shard per task stream: per task  enqueue (EVALSHA = XLEN + XADD), the reply
  (XADD + EXPIRE + XACK + XDEL), the API's reply read (XREAD + XDEL per batch of ≤ 100 replies)
  and the worker's reads (XREADGROUP, one per ≤ 32 tasks); in the background every worker
  beats (SET / 2 s) and checks for dead workers (XINFO CONSUMERS + one EXISTS per other
  consumer, every 2 s, per stream), every API refreshes the fleet (INFO + SCAN + MGET / 1 s);
* cache Redis: HMGET per sequence, HSET + EXPIRE per computed one; spread over shards;
* a command costs the calibrated per-call overhead of this machine's Redis (redis-benchmark,
  50 clients) plus its own measured server time (INFO commandstats);
* API: its measured CPU per request; a GPU worker: turns of up to 16 token budgets, each
  residue costing Σ 1/rate over the levels k needs (gpu.json, bf16).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS

GPU_JSON = RESULTS / "gpu.json"
OPS_JSON = RESULTS / "redis_ops.json"
DOCS = REPO / "docs"
#: ESM-2 levels smallest first and the dims of their RD embeddings.
DIMS = {"8M": 320, "35M": 480, "150M": 640, "650M": 1280, "3B": 2560}
#: What the worker's defaults are (models/specs.py esm2 on CUDA; app/core/worker.DRAIN_BATCHES).
CUDA_TOKEN_BUDGET = 16_384
DRAIN_BATCHES = 16
READ_COUNT = 32  # tasks per XREADGROUP (app/transport/consumer.py)
REPLY_BATCH = 100  # replies per XREAD of the API's reply reader
HEARTBEAT_S, DEAD_CHECK_S, FLEET_REFRESH_S = 2.0, 2.0, 1.0
RESIDUES = 300


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def levels_for(k: int) -> list[str]:
    """The chain prefix a k-dimensional embedding needs (first level whose dim is ≥ k)."""
    need = [name for name, d in DIMS.items() if d >= k]
    if not need:
        raise ValueError(f"k = {k} is above the largest level ({max(DIMS.values())})")
    names = list(DIMS)
    return names[: names.index(need[0]) + 1]


def seconds_per_residue(
    gpu: dict[str, Any], levels: list[str], dtype: str = "bf16", per_residue: bool = False
) -> float:
    """GPU seconds per residue through ``levels``: Σ_l 1 / rate_l (gpu.json), divided by the
    measured RD / raw throughput ratio (pooled: ``mean``; per residue: its worst, ``min``)."""
    rates = gpu["per_level"][dtype]
    raw = sum(1.0 / rates[lv]["residues_per_s"] for lv in levels)
    rd = gpu["rd_vs_raw"]["per_residue" if per_residue else "mean"]
    return raw / (rd["min"] if per_residue else rd["rd_over_raw"])


def gpus_needed(
    gpu: dict[str, Any], requests_per_s: float, k: int, residues: int = RESIDUES, miss: float = 1.0
) -> float:
    """GPUs (H100, bf16, pooled) busy with ``requests_per_s`` requests of one sequence of
    ``residues`` at k, a fraction ``miss`` of them computed: λ · L · miss · s_res(k)."""
    return requests_per_s * residues * miss * seconds_per_residue(gpu, levels_for(k))


def worker_grace_s(gpu: dict[str, Any] | None = None, ops: dict[str, Any] | None = None) -> dict:
    """A worker's terminationGracePeriodSeconds: on SIGTERM it finishes its current turn, then
    leaves. A turn drains queued tasks up to DRAIN_BATCHES token budgets of residues
    (16 × 16,384), but a task is never split: one request of up to ``max_residues`` (2^20) is a
    turn of its own, and the larger of the two bounds the turn.

        R = max(16 · 16,384, max_residues)
        turn_s = R · Σ_{l ∈ 8M…3B} 1/rate_l / (RD/raw per residue, worst)
        grace_s = ⌈(turn_s + exit_s) / 5⌉ · 5

    rate_l: bf16 residues/s of every measured ESM-2 level on an H100 (gpu.json; the largest
    supported chain, so any chain up to 3B is covered); exit_s: an idle worker's SIGTERM-to-exit
    time (redis_ops.json, the slowest of its stops). float32 is reported beside it
    (``float32_grace_s``). Not covered: a read that brings several maximal requests at once (up
    to 32 tasks a read), and the transfer of large per-residue results."""
    from app.settings import Settings

    gpu = gpu or _load(GPU_JSON)
    ops = ops or _load(OPS_JSON)
    drain = DRAIN_BATCHES * CUDA_TOKEN_BUDGET
    max_request = Settings.model_fields["max_residues"].default
    residues = max(drain, max_request)
    exit_s = ops["worker_exit_s"]["max"]
    out: dict[str, Any] = {
        "drain_residues": drain,
        "max_request_residues": max_request,
        "turn_residues": residues,
        "exit_s": exit_s,
    }
    for dtype, key in (("bf16", ""), ("fp32", "float32_")):
        per_residue = seconds_per_residue(gpu, list(DIMS), dtype, per_residue=True)
        out[f"{key}drain_turn_s"] = drain * per_residue
        out[f"{key}turn_s"] = turn = residues * per_residue
        out[f"{key}grace_s"] = 5 * math.ceil((turn + exit_s) / 5)
    return out


def cache_memory_table(ops: dict[str, Any]) -> list[dict[str, Any]]:
    """Redis memory for 10^6 and 10^8 cached sequences at each k (used_memory per key)."""
    rows = []
    for name, lv in ops["cache_memory"]["levels"].items():
        pooled = lv["pooled"]["used_memory_bytes_per_key"]
        per_res = lv["per_residue"]["used_memory_bytes_per_key"]
        rows.append(
            {
                "level": name,
                "k": lv["k"],
                "pooled_bytes": pooled,
                "pooled_overhead": lv["pooled"]["overhead_ratio"],
                "per_residue_bytes": per_res,
                "pooled_1e6_gb": pooled * 1e6 / 1e9,
                "pooled_1e8_gb": pooled * 1e8 / 1e9,
                "per_residue_1e6_gb": per_res * 1e6 / 1e9,
                "per_residue_1e8_tb": per_res * 1e8 / 1e12,
            }
        )
    return rows


# -- costs ----------------------------------------------------------------------------------------
#: Commands sent once per request or task (everything else the cluster sends is periodic).
PER_TASK = ("evalsha", "xlen", "xadd", "expire", "xack", "xdel", "xreadgroup", "xread")


@dataclass
class Costs:
    """Service times (µs) measured by benchmarks/redis_ops.py."""

    io_us: float  # per-call overhead of a busy Redis (calibration)
    usec: dict[str, float]  # server µs per call of each command (commandstats)
    api_ms: dict[str, float]  # API CPU per request by tier, at S sequences per request
    exists_us: float
    xinfo_us: dict[int, float]  # XINFO CONSUMERS µs by consumers in the group
    scan_us: dict[int, float]  # one heartbeat refresh (SCAN pages + MGET) by workers
    seqs: int  # sequences per request the API costs were measured at
    reads_per_reply: float  # the API's XREADs per reply, as batched in the measured phase

    def op(self, cmd: str, n: float = 1.0) -> float:
        return n * (self.io_us + self.usec.get(cmd, 0.0))

    def enqueue_us(self) -> float:
        return self.op("evalsha") + self.usec.get("xlen", 0.0) + self.usec.get("xadd", 0.0)

    def reply_us(self) -> float:  # one pipeline: XADD reply, EXPIRE, XACK, XDEL task
        return self.op("xadd") + self.op("expire") + self.op("xack") + self.op("xdel")

    def read_reply_us(self) -> float:
        """The API's share per reply of reading its reply stream: XREAD + XDEL per batch, as
        batched in the measured phase (at most REPLY_BATCH replies per read)."""
        per_read = max(self.reads_per_reply, 1 / REPLY_BATCH)
        return per_read * (self.op("xread") + self.op("xdel"))

    def take_us(self) -> float:
        return self.op("xreadgroup")

    def dead_check_us(self, n_workers: int) -> float:
        """One worker's dead-worker check on one stream: XINFO CONSUMERS + an EXISTS for each
        other consumer."""
        return _interp(self.xinfo_us, n_workers) + (n_workers - 1) * (self.io_us + self.exists_us)

    def refresh_us(self, n_workers: int) -> float:
        """One API's fleet refresh: INFO + SCAN pages + MGET of the heartbeats."""
        return self.op("info") + _interp(self.scan_us, n_workers)


def _interp(table: dict[int, float], n: int) -> float:
    """Linear interpolation (and extrapolation from the last two points) in n."""
    xs = sorted(table)
    if n <= xs[0]:
        return table[xs[0]] * n / xs[0]
    for a, b in itertools.pairwise(xs):
        if n <= b:
            return table[a] + (table[b] - table[a]) * (n - a) / (b - a)
    a, b = xs[-2], xs[-1]
    return table[b] + (table[b] - table[a]) * (n - b) / (b - a)


def costs_from(ops: dict[str, Any], seqs: int) -> Costs:
    """Costs from redis_ops.json: the phase at ``seqs`` sequences per request with the most
    clients (commands batched as under load)."""
    phases = [p for p in ops["serve"]["phases"] if p["miss"]["sequences_per_request"] == seqs]
    ph = max(phases, key=lambda p: p["miss"]["concurrency"])
    usec: dict[str, float] = {}
    for tier in ("miss", "partial", "full_hit"):
        for inst in ("queue", "cache"):
            for cmd, us in ph[tier][inst]["usec"].items():
                usec[cmd] = max(usec.get(cmd, 0.0), us)
    cal = ops["calibration"]
    io = min(c["cpu_us_per_call"] - c["server_usec_per_call"] for c in cal.values())
    rows = ops["fleet"]["rows"]
    return Costs(
        io_us=io,
        usec=usec,
        api_ms={t: ph[t]["api_cpu_ms"] for t in ("miss", "partial", "full_hit")},
        exists_us=sum(r["exists_us"] for r in rows) / len(rows),
        xinfo_us={r["workers"]: r["xinfo_consumers_us"] for r in rows},
        scan_us={r["workers"]: r["scan_refresh_us"] for r in rows},
        seqs=seqs,
        # The fewest XREADs per reply any phase saw: in slow phases the reader's 1 s blocking
        # reads also time out while requests wait, which is waiting, not work per reply.
        reads_per_reply=min(
            p["miss"]["queue"]["calls"].get("xread", 1.0) for p in ops["serve"]["phases"]
        ),
    )


# -- analytic utilisation -------------------------------------------------------------------------
@dataclass
class Fleet:
    """A deployment: N GPU workers, API replicas, queue shards (task streams), fixes applied."""

    workers: int
    apis: int
    streams: int = 1  # task streams per artifact, one per queue shard (1: today's design)
    dead_check_per_fleet: bool = False  # the fix: one worker per interval checks (a lock)
    stream_count: int = 2  # streams each dead check walks (tasks and bulk)
    cache_shards: int = 8


@dataclass
class Load:
    """Offered traffic: requests/s of ``seqs`` sequences of 300 residues at k."""

    requests_per_s: float
    k: int = 640
    seqs: int = 1
    miss: float = 1.0  # fraction of sequences computed (the rest are full hits)


def utilisation(fleet: Fleet, load: Load, c: Costs, gpu: dict[str, Any]) -> dict[str, float]:
    """Busy fraction of each shared resource (1.0 = saturated): the queue Redis shard, a cache
    shard, an API replica, a GPU."""
    lam = load.requests_per_s
    tasks = lam * (1.0 if load.miss > 0 else 0.0)  # a request with any miss queues one task
    per_task = (
        c.enqueue_us()
        + c.reply_us()
        + c.read_reply_us()
        + c.take_us() / min(READ_COUNT, max(1.0, tasks / max(1, fleet.workers)))
    )
    checks = 1 if fleet.dead_check_per_fleet else fleet.workers
    background = (
        fleet.workers * c.op("set") / HEARTBEAT_S
        + checks * fleet.stream_count * c.dead_check_us(fleet.workers) / DEAD_CHECK_S
        + fleet.apis * c.refresh_us(fleet.workers) / FLEET_REFRESH_S
    )
    queue = (tasks * per_task / fleet.streams + background) / 1e6
    seqs = lam * load.seqs
    cache = seqs * (c.op("hmget") + load.miss * (c.op("hset") + c.op("expire")))
    tier = "miss" if load.miss >= 0.5 else "full_hit"
    api = lam * c.api_ms[tier] * load.seqs / c.seqs / 1e3 / fleet.apis
    work = seqs * load.miss * RESIDUES * seconds_per_residue(gpu, levels_for(load.k))
    return {
        "queue_redis": queue,
        "queue_background": background / 1e6,
        "cache_redis": cache / 1e6 / fleet.cache_shards,
        "api": api,
        "gpu": work / fleet.workers,
    }


# -- simulation -----------------------------------------------------------------------------------
@dataclass
class SimResult:
    offered: float
    served: float
    p50_s: float
    p99_s: float
    busy: dict[str, float] = field(default_factory=dict)


def simulate(
    fleet: Fleet,
    load: Load,
    c: Costs,
    gpu: dict[str, Any],
    horizon_s: float,
    seed: int = 0,
) -> SimResult:
    """Discrete-event run (simpy) of the request path: Poisson arrivals → an API replica
    (its CPU per request; cache lookup on a cache shard) → enqueue on the queue shard → a free
    GPU worker takes up to 16 token budgets of queued tasks (XREADGROUP per ≤ 32), computes,
    replies per task → the API's reply reader → cache store. Background Redis work (heartbeats,
    dead-worker checks, fleet refreshes) runs as periodic jobs on the queue shard. Latency is
    arrival to reply; requests still open at the end count as not served."""
    import simpy

    rng = random.Random(seed)
    env = simpy.Environment()
    queue_redis = [simpy.Resource(env, 1) for _ in range(fleet.streams)]
    cache_redis = [simpy.Resource(env, 1) for _ in range(fleet.cache_shards)]
    apis = [simpy.Resource(env, 1) for _ in range(fleet.apis)]
    streams = [simpy.Store(env) for _ in range(fleet.streams)]
    busy: dict[str, float] = {"queue_redis": 0.0, "cache_redis": 0.0, "api": 0.0, "gpu": 0.0}
    s_res = seconds_per_residue(gpu, levels_for(load.k))
    budget = DRAIN_BATCHES * CUDA_TOKEN_BUDGET
    api_s = c.api_ms["miss"] * load.seqs / c.seqs / 1e3
    latencies: list[float] = []
    warm = horizon_s * 0.2

    def hold(res: simpy.Resource, seconds: float, kind: str):
        with res.request() as req:
            yield req
            yield env.timeout(seconds)
            busy[kind] += seconds

    def request(t0: float, shard: int):
        api = rng.choice(apis)
        cache = rng.choice(cache_redis)
        yield env.process(hold(api, api_s, "api"))
        yield env.process(hold(cache, c.op("hmget", load.seqs) / 1e6, "cache_redis"))
        if rng.random() < load.miss:
            yield env.process(hold(queue_redis[shard], c.enqueue_us() / 1e6, "queue_redis"))
            done = env.event()
            yield streams[shard].put((load.seqs * RESIDUES, done, shard))
            yield done
            yield env.process(hold(queue_redis[shard], c.read_reply_us() / 1e6, "queue_redis"))
            store = c.op("hset", load.seqs) + c.op("expire", load.seqs)
            yield env.process(hold(cache, store / 1e6, "cache_redis"))
        if t0 >= warm:
            latencies.append(env.now - t0)

    def arrivals():
        i = 0
        while True:
            yield env.timeout(rng.expovariate(load.requests_per_s))
            i += 1
            env.process(request(env.now, i % fleet.streams))

    def worker(w: int):
        shard = w % fleet.streams  # its home shard: where it waits when all are empty
        next_check = rng.random() * DEAD_CHECK_S
        while True:
            if env.now >= next_check and (not fleet.dead_check_per_fleet or w == 0):
                next_check = env.now + DEAD_CHECK_S
                for _ in range(fleet.stream_count):  # sequential round trips, Redis time only
                    yield env.process(
                        hold(
                            queue_redis[shard],
                            c.dead_check_us(fleet.workers) / 1e6,
                            "queue_redis",
                        )
                    )
            store, redis_ = streams[shard], queue_redis[shard]
            if fleet.streams > 1:  # a worker reads every shard: the fullest first (XLEN each)
                for q in queue_redis:
                    yield env.process(hold(q, c.op("xlen") / 1e6, "queue_redis"))
                fullest = max(range(fleet.streams), key=lambda i: len(streams[i].items))
                if streams[fullest].items:
                    store, redis_ = streams[fullest], queue_redis[fullest]
            get = store.get()
            got = yield get | env.timeout(0.5)
            if get not in got:
                get.cancel()
                yield env.process(hold(redis_, c.take_us() / 1e6, "queue_redis"))
                continue
            batch = [got[get]]
            residues = batch[0][0]
            while residues < budget and store.items:
                item = yield store.get()
                batch.append(item)
                residues += item[0]
            reads = math.ceil(len(batch) / READ_COUNT) + 1
            yield env.process(hold(redis_, reads * c.take_us() / 1e6, "queue_redis"))
            yield env.timeout(residues * s_res)
            busy["gpu"] += residues * s_res
            for _, done, _ in batch:
                yield env.process(hold(redis_, c.reply_us() / 1e6, "queue_redis"))
                done.succeed()

    def periodic(period: float, cost_us: float, shard: int):
        yield env.timeout(rng.random() * period)
        while True:
            yield env.process(hold(queue_redis[shard], cost_us / 1e6, "queue_redis"))
            yield env.timeout(period)

    env.process(arrivals())
    for w in range(fleet.workers):
        env.process(worker(w))
        env.process(periodic(HEARTBEAT_S, c.op("set"), w % fleet.streams))
    for a in range(fleet.apis):
        env.process(periodic(FLEET_REFRESH_S, c.refresh_us(fleet.workers), a % fleet.streams))
    env.run(until=horizon_s)
    latencies.sort()
    n = len(latencies)
    span = horizon_s - warm
    counts = {
        "queue_redis": fleet.streams,
        "cache_redis": fleet.cache_shards,
        "api": fleet.apis,
        "gpu": fleet.workers,
    }
    return SimResult(
        offered=load.requests_per_s,
        served=n / span,
        p50_s=latencies[n // 2] if n else math.inf,
        p99_s=latencies[min(n - 1, int(n * 0.99))] if n else math.inf,
        busy={k: v / horizon_s / counts[k] for k, v in busy.items()},
    )


# -- the report -----------------------------------------------------------------------------------
def apis_for(requests_per_s: float, c: Costs, seqs: int) -> int:
    """API replicas that keep each under 70 % CPU at this load (the deploy rule)."""
    return max(2, math.ceil(requests_per_s * c.api_ms["miss"] * seqs / c.seqs / 1e3 / 0.7))


def fleet_capacity(workers: int, k: int, seqs: int, gpu: dict[str, Any]) -> float:
    """Requests/s that keep ``workers`` GPUs busy (all misses)."""
    return workers / (seqs * RESIDUES * seconds_per_residue(gpu, levels_for(k)))


#: "before": a dead-worker check by every worker (commit 0f2695e, where the costs were
#: measured); "now": one check per fleet and interval (a lock, built since); "+ 8 task streams":
#: the next step (not built).
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("before: a check per worker", {}),
    ("now: one check per fleet", {"dead_check_per_fleet": True}),
    ("+ 8 task streams (not built)", {"dead_check_per_fleet": True, "streams": 8}),
)
SIM_VARIANTS = VARIANTS


def run(quick: bool = False) -> dict[str, Any]:
    gpu, ops = _load(GPU_JSON), _load(OPS_JSON)
    out: dict[str, Any] = {"grace": worker_grace_s(gpu, ops)}
    out["gpus"] = [
        {
            "k": k,
            "levels": levels_for(k),
            "residues_per_s_per_gpu": 1 / seconds_per_residue(gpu, levels_for(k)),
            "gpus_1000_rps_300aa": gpus_needed(gpu, 1000, k),
            "gpus_1000_rps_300aa_half_cached": gpus_needed(gpu, 1000, k, miss=0.5),
        }
        for k in (320, 640, 1280, 2560)
    ]
    out["memory"] = cache_memory_table(ops)
    # Analytic: utilisation of each resource at 90 % GPU load, workers 10 … 1000.
    sweeps = []
    for seqs in (1, 32):
        c = costs_from(ops, seqs)
        for variant, kw in VARIANTS:
            for n in (10, 30, 100, 300, 1000):
                lam = 0.9 * fleet_capacity(n, 640, seqs, gpu)
                fleet = Fleet(n, apis_for(lam, c, seqs), **kw)
                u = utilisation(fleet, Load(lam, 640, seqs), c, gpu)
                sweeps.append(
                    {"seqs": seqs, "variant": variant, "workers": n, "apis": fleet.apis}
                    | {"requests_per_s": lam}
                    | u
                )
    out["utilisation"] = sweeps
    # Simulation: 10, 100, 1,000 workers, requests of 32 sequences at k = 640, offered load
    # from 50 % to 110 % of the GPUs' capacity; today's design and with the dead-check fix.
    c = costs_from(ops, 32)
    sims = []
    fracs = (0.5, 0.9) if quick else (0.5, 0.8, 0.95, 1.1)
    sizes = (10, 100) if quick else (10, 100, 1000)
    for n in sizes:
        for variant, kw in SIM_VARIANTS:
            for f in fracs:
                lam = f * fleet_capacity(n, 640, 32, gpu)
                fleet = Fleet(n, apis_for(lam, c, 32), **kw)
                horizon = (8.0 if quick else 30.0) if n <= 100 else (4.0 if quick else 8.0)
                t0 = time.perf_counter()
                r = simulate(fleet, Load(lam, 640, 32), c, gpu, horizon)
                sims.append(
                    {"workers": n, "variant": variant, "load": f, "apis": fleet.apis}
                    | {"offered": r.offered, "served": r.served, "p50_s": r.p50_s, "p99_s": r.p99_s}
                    | {f"busy_{k}": v for k, v in r.busy.items()}
                    | {"wall_s": time.perf_counter() - t0}
                )
                print(
                    f"  {n} workers, {variant}, load {f:.2f}: served {r.served / r.offered:.2f} of "
                    f"{r.offered:,.0f} req/s, p99 {r.p99_s:.2f} s, queue Redis "
                    f"{r.busy['queue_redis']:.2f}, GPU {r.busy['gpu']:.2f}",
                    flush=True,
                )
    out["simulation"] = sims
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    """Queue-Redis utilisation vs workers (analytic) and served / offered vs load (simulated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for seqs, style in ((1, "-"), (32, "--")):
        for variant, color in (
            (VARIANTS[0][0], "C3"),
            (VARIANTS[1][0], "C0"),
            (VARIANTS[2][0], "C2"),
        ):
            rows = [r for r in res["utilisation"] if r["seqs"] == seqs and r["variant"] == variant]
            a.plot(
                [r["workers"] for r in rows],
                [r["queue_redis"] for r in rows],
                style,
                color=color,
                marker="o",
                label=f"{variant}, {seqs} seq/request",
            )
    a.axhline(1.0, color="k", lw=0.8)
    a.set(
        xscale="log",
        yscale="log",
        xlabel="GPU workers (at 90 % GPU load, k = 640)",
        ylabel="queue Redis main-thread utilisation",
        title="Queue Redis (one shard)",
    )
    a.legend(fontsize=7)
    for n, color in ((10, "C0"), (100, "C1"), (1000, "C3")):
        for variant, style in (
            (VARIANTS[0][0], "-"),
            (VARIANTS[1][0], "--"),
            (VARIANTS[2][0], ":"),
        ):
            rows = [r for r in res["simulation"] if r["workers"] == n and r["variant"] == variant]
            if rows:
                b.plot(
                    [r["load"] for r in rows],
                    [r["served"] / r["offered"] for r in rows],
                    style,
                    color=color,
                    marker="o",
                    label=f"{n} workers, {variant}",
                )
    b.set(
        xlabel="offered load / GPU capacity (32 seq/request, k = 640)",
        ylabel="served / offered",
        title="Simulation (simpy)",
        ylim=(0, 1.1),
    )
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


#: The commands of the request path, in order: (instance, command). Stages: cache lookup
#: (HMGET); enqueue (EVALSHA, which runs XLEN + XADD of the task); claim (XREADGROUP); reply
#: (XADD + EXPIRE of the reply stream) and ack (XACK + XDEL of the task); the API's reply read
#: (XREAD + XDEL of the reply); cache store (HSET + EXPIRE).
PATH_COMMANDS = (
    ("cache", "hmget"),
    ("queue", "evalsha"),
    ("queue", "xlen"),
    ("queue", "xreadgroup"),
    ("queue", "xadd"),
    ("queue", "expire"),
    ("queue", "xack"),
    ("queue", "xdel"),
    ("queue", "xread"),
    ("cache", "hset"),
    ("cache", "expire"),
)


def ops_tables(ops: dict[str, Any]) -> str:
    """Markdown: Redis commands per request by command and tier, and Redis / API CPU."""
    head = [f"{c.upper()} ({inst})" for inst, c in PATH_COMMANDS]
    lines = [
        "| seq/req | clients | tier | " + " | ".join(head) + " | periodic | queue ops | "
        "cache ops | Redis CPU µs/req | API CPU ms/req |",
        "|---" * (len(PATH_COMMANDS) + 8) + "|",
    ]
    for ph in ops["serve"]["phases"]:
        for tier in ("miss", "partial", "full_hit"):
            r = ph[tier]
            cells = [f"{r[inst]['calls'].get(c, 0.0):.2f}" for inst, c in PATH_COMMANDS]
            other = sum(
                v
                for inst in ("queue", "cache")
                for cmd, v in r[inst]["calls"].items()
                if (inst, cmd) not in PATH_COMMANDS
            )
            cpu = r["queue"]["cpu_us"] + r["cache"]["cpu_us"]
            lines.append(
                f"| {r['sequences_per_request']} | {r['concurrency']} | {tier} | "
                + " | ".join(cells)
                + f" | {other:.2f} | {r['queue']['total']:.1f} | {r['cache']['total']:.1f} | "
                f"{cpu:.0f} | {r['api_cpu_ms']:.2f} |"
            )
    bg = ops["serve"]["background_1api_1worker"]["queue"]["calls_per_s"]
    lines += [
        "",
        "Idle cluster (1 API, 1 worker), queue Redis calls per second: "
        + ", ".join(f"{k.upper()} {v:.2f}" for k, v in sorted(bg.items())),
    ]
    return "\n".join(lines)


def markdown(res: dict[str, Any]) -> str:
    g = res["grace"]
    lines = [
        f"Worker grace: turn of {g['turn_residues']:,} residues {g['turn_s']:.2f} s (16 budgets "
        f"alone {g['drain_turn_s']:.2f} s) + exit {g['exit_s']:.2f} s → {g['grace_s']} s "
        f"(float32: turn {g['float32_turn_s']:.1f} s → {g['float32_grace_s']} s)",
        "",
        "| k | levels | residues/s per H100 (bf16, pooled RD) | H100s for 1,000 req/s × 300 aa | half cached |",
        "|---|---|---|---|---|",
    ]
    for r in res["gpus"]:
        lines.append(
            f"| {r['k']} | {' → '.join(r['levels'])} | {r['residues_per_s_per_gpu']:,.0f} | "
            f"{r['gpus_1000_rps_300aa']:.2f} | {r['gpus_1000_rps_300aa_half_cached']:.2f} |"
        )
    lines += [
        "",
        "| level (k) | pooled B/seq | ×payload | 10⁶ seqs | 10⁸ seqs | per residue (300 aa) MB/seq | 10⁶ seqs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["memory"]:
        lines.append(
            f"| {r['level']} ({r['k']}) | {r['pooled_bytes']:,.0f} | {r['pooled_overhead']:.2f} | "
            f"{r['pooled_1e6_gb']:.2f} GB | {r['pooled_1e8_gb']:,.0f} GB | "
            f"{r['per_residue_bytes'] / 1e6:.2f} | {r['per_residue_1e6_gb']:,.0f} GB |"
        )
    lines += [
        "",
        "| seq/req | variant | workers | APIs | req/s | queue Redis | of it background | cache shard | API | GPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["utilisation"]:
        lines.append(
            f"| {r['seqs']} | {r['variant']} | {r['workers']} | {r['apis']} | {r['requests_per_s']:,.0f} | "
            f"{r['queue_redis']:.3f} | {r['queue_background']:.3f} | {r['cache_redis']:.3f} | "
            f"{r['api']:.2f} | {r['gpu']:.2f} |"
        )
    lines += [
        "",
        "| workers | variant | load | APIs | offered req/s | served / offered | p50 s | p99 s | queue Redis busy | GPU busy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["simulation"]:
        lines.append(
            f"| {r['workers']} | {r['variant']} | {r['load']:.2f} | {r['apis']} | {r['offered']:,.0f} | "
            f"{r['served'] / r['offered']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
            f"{r['busy_queue_redis']:.2f} | {r['busy_gpu']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS / "capacity.json")
    ap.add_argument("--plot", type=Path, default=DOCS / "scaling-capacity.png")
    args = ap.parse_args()
    res = run(args.quick)
    command = "python -m benchmarks.capacity" + (" --quick" if args.quick else "")
    args.out.write_text(json.dumps({"command": command, **res}, indent=2) + "\n")
    plot(res, args.plot)
    print(ops_tables(_load(OPS_JSON)))
    print()
    print(markdown(res))
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
