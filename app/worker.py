"""The worker: one loop owns batching — drain queued jobs, run level groups, reply.

The same loop serves both modes; only the job source differs (an in-process queue in
embedded mode, a Redis Stream consumer group in distributed mode).  Jobs are grouped by the
chain segment they need (pooling, policy, first and last level), groups run smallest-k first,
and each job is answered as soon as all of its items are done: a k = 320 request never waits
for a 650M forward that only another request needs.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from app import metrics as m
from app.jobs import ItemResult, Job, JobResult
from models.blocks import ItemFailure
from models.sequences import LongSequencePolicy, Pooling

if TYPE_CHECKING:  # torch-heavy; the worker receives a ready Embedder
    from models.embedder import Embedder
    from models.extract import ForwardStats

log = logging.getLogger(__name__)

DRAIN_BATCHES = 16  # token budgets of queued residues gathered per worker turn


class JobSource(Protocol):
    """Where jobs come from and where answers go."""

    def take(self, budget: int, wait_s: float) -> list[Job]:
        """Block briefly for a first job, then gather more for up to wait_s or ~budget residues."""
        ...

    def reply(self, job: Job, result: JobResult) -> None:
        """Deliver a job's result (and acknowledge it)."""
        ...


@dataclass
class WorkerState:
    """What readiness reports: which levels are loaded and warmed."""

    name: str  # worker id
    levels: int  # levels in the chain
    loaded: list[bool] = field(default_factory=list)  # weights resident per level
    ready: list[bool] = field(default_factory=list)  # warmed per level
    running: bool = False  # loop alive
    error: str | None = None  # fatal start-up error (e.g. weights unavailable)

    def __post_init__(self) -> None:
        self.loaded = [False] * self.levels
        self.ready = [False] * self.levels

    @property
    def ready_levels(self) -> int:
        """Levels usable right now: the warmed prefix of the chain."""
        n = 0
        while n < self.levels and self.ready[n]:
            n += 1
        return n


def freeze_heap() -> None:
    """Move every object alive now (models, libraries) out of the garbage collector's reach.

    With torch and transformers loaded a full collection walks ~400k objects and takes ~200 ms
    on this CPU; one landing inside a request showed up as a 130 ms p99 on cache hits.  Frozen
    objects are never scanned again, so later collections only see per-request garbage.
    """
    gc.collect()
    gc.freeze()


def observe_forward(level_names: list[str], first_level: int) -> Callable[[ForwardStats], None]:
    """An Extractor observer that feeds the Prometheus metrics."""

    def observer(s: ForwardStats) -> None:
        name = level_names[s.level]
        m.FORWARD_DURATION.labels(name).observe(s.seconds)
        m.RESIDUES.labels(name).inc(s.residues)
        # Every level of a batch sees the same batch: record its shape once, at the first level.
        if s.level == first_level:
            m.BATCH_SEQUENCES.observe(s.rows)
            m.BATCH_RESIDUES.observe(s.residues)
            m.BATCH_PADDING.observe(1.0 - s.residues / max(1, s.padded_tokens))

    return observer


class Worker:
    """Runs jobs from a source through an Embedder."""

    def __init__(
        self,
        embedder: Embedder,
        source: JobSource,
        name: str,
        token_budget: int,
        batch_wait_s: float,
    ) -> None:
        self.embedder = embedder
        self.source = source
        # Drain up to several batches of queued work per turn: planning them together sorts
        # all their sequences by length (less padding), and iter_compute still answers each job
        # when its own batch is done.
        self.drain_residues = DRAIN_BATCHES * token_budget
        self.wait_s = batch_wait_s
        self.artifact_sha = embedder.artifact.sha256
        self.level_names = [lv.name for lv in embedder.artifact.levels]
        self.state = WorkerState(name, len(self.level_names))
        self.last_turn = time.time()  # unix time of the last loop turn (liveness)
        self._stop = threading.Event()

    # -- start-up -------------------------------------------------------------------------------
    def warmup(self, run_batch: bool = True) -> None:
        """Load each level (smallest first) and run a tiny batch through it; readiness grows."""
        fam = self.embedder.family
        for lvl, name in enumerate(self.level_names):
            t0 = time.perf_counter()
            fam.load(lvl)
            m.MODEL_LOAD.labels(name).set(time.perf_counter() - t0)
            self.state.loaded[lvl] = True
            if run_batch:
                plans, _ = self.embedder.extractor.plan(["MKTAYIAKQRQISFVKSHFSRQ"] * 2)
                self.embedder.extractor.run(plans[0], [lvl], Pooling.mean)
            self.state.ready[lvl] = True
            m.MODEL_LOADED.labels(name).set(1)
            freeze_heap()
            log.info(
                "level ready",
                extra={"model_level": name, "load_s": round(time.perf_counter() - t0, 3)},
            )

    # -- loop -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the jobs taken in the current turn, then leave the loop."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Serve until stop(); each turn drains a batch of jobs and processes it."""
        self.state.running = True
        m.WORKER_UP.set(1)
        try:
            while not self._stop.is_set():
                self.last_turn = time.time()
                m.WORKER_HEARTBEAT.set(self.last_turn)
                try:
                    jobs = self.source.take(self.drain_residues, self.wait_s)
                except Exception:  # a queue hiccup must not end the worker
                    log.exception("taking jobs failed; retrying")
                    self._stop.wait(1.0)
                    continue
                if jobs:
                    self.process(jobs)
        finally:
            self.state.running = False
            m.WORKER_UP.set(0)

    def process(self, jobs: list[Job]) -> None:
        """Compute every item of the jobs, grouped by the chain segment they need."""
        now = time.time()
        live: list[Job] = []
        for job in jobs:
            if job.deadline < now:
                self._answer(
                    job, JobResult(job.id, error="deadline passed before compute", code="timeout")
                )
            elif job.artifact != self.artifact_sha:
                self._answer(
                    job,
                    JobResult(
                        job.id,
                        code="artifact_mismatch",
                        error=f"worker serves artifact {self.artifact_sha[:12]}, job needs "
                        f"{job.artifact[:12]}",
                    ),
                )
            else:
                live.append(job)
        groups: dict[tuple[str, str, int, int], list[tuple[int, int]]] = defaultdict(list)
        for j, job in enumerate(live):
            for i, it in enumerate(job.items):
                groups[(job.pooling, job.policy, it.start, it.stop)].append((j, i))
        results: list[list[ItemResult | None]] = [[None] * len(job.items) for job in live]
        pending = [len(job.items) for job in live]
        failed = [False] * len(live)
        for key in sorted(groups, key=lambda g: (g[3], g[2])):
            pooling, policy, start, stop = key
            members = [(j, i) for j, i in groups[key] if not failed[j]]
            if not members:
                continue
            items = [live[j].items[i] for j, i in members]
            batches = self.embedder.iter_compute(
                [it.seq for it in items],
                stop=stop,
                start=start,
                pooling=Pooling(pooling),
                policy=LongSequencePolicy(policy),
                prefixes=[it.prefix for it in items] if start > 0 else None,
                observer=observe_forward(self.level_names, start),
            )
            try:
                # Batches are length-sorted over every drained job; a job is answered as soon
                # as the batch holding its last item is done, not when the whole drain is.
                for done in batches:
                    for k, r in done:
                        j, i = members[k]
                        if isinstance(r, ItemFailure):  # failed even alone: only this item
                            code = "out_of_memory" if r.out_of_memory else "compute_failed"
                            m.ITEM_FAILURES.labels(code).inc()
                            results[j][i] = ItemResult([], 0, "", error=r.message, code=code)
                        else:
                            results[j][i] = ItemResult(
                                [np.asarray(b, dtype=np.float32) for b in r.blocks],
                                r.residues,
                                str(r.handling),
                            )
                        pending[j] -= 1
                        if pending[j] == 0 and not failed[j]:
                            done_items: list[ItemResult] = results[j]  # type: ignore[assignment]
                            self._answer(live[j], JobResult(live[j].id, items=done_items))
            except Exception as e:  # answer the affected jobs, keep serving
                log.exception("compute failed")
                for j in {j for j, _ in members if pending[j] > 0 and not failed[j]}:
                    failed[j] = True
                    self._answer(
                        live[j],
                        JobResult(live[j].id, error=f"compute failed: {e}", code="internal"),
                    )

    def _answer(self, job: Job, result: JobResult) -> None:
        result.worker = self.state.name
        try:
            self.source.reply(job, result)
        except Exception:
            log.exception("reply failed", extra={"job": job.id})
