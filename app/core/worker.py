"""The worker: one loop owns batching — drain queued tasks, run level groups, reply.

The same loop serves both modes; only the task source differs (an in-process queue in
embedded mode, a Redis Stream consumer group in distributed mode).  Tasks are grouped by the
chain segment they need (pooling, policy, first and last level), groups run smallest-k first,
and each task is answered as soon as all of its items are done: a k = 320 request never waits
for a 650M forward that only another request needs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from app import metrics as m
from app.core.heap import freeze_heap
from app.core.tasks import ItemResult, Task, TaskResult
from models.blocks import ItemFailure
from models.sequences import LongSequencePolicy, Pooling

if TYPE_CHECKING:  # torch-heavy; the worker receives a ready Embedder
    from models.embedder import Embedder
    from models.extract import ForwardStats

log = logging.getLogger(__name__)

DRAIN_BATCHES = 16  # token budgets of queued residues gathered per worker turn
#: Between batches, how often the worker asks whether a task it holds was withdrawn (its request
#: gave up: timeout, client gone, the API's shutdown window) or is past its deadline.
WITHDRAW_CHECK_S = 0.25


class TaskSource(Protocol):
    """Where tasks come from and where answers go."""

    def take(self, budget: int, wait_s: float) -> list[Task]:
        """Block briefly for a first task, then gather more for up to wait_s or ~budget residues
        (implementations call :func:`gather`)."""
        ...

    def reply(self, task: Task, result: TaskResult) -> None:
        """Deliver a task's result (and acknowledge it)."""
        ...

    def withdrawn(self, tasks: list[Task]) -> set[str]:
        """Ids of those tasks whose request has given up (nobody waits for their answer)."""
        ...

    def skip(self, task: Task) -> None:
        """Acknowledge a withdrawn task without answering it."""
        ...


def gather(
    first: list[Task], more: Callable[[float], list[Task]], budget: int, wait_s: float
) -> list[Task]:
    """The first tasks, then more while they hold under ``budget`` residues: waiting up to
    ``wait_s`` in all for new ones, then taking only what is already queued.

    ``more(timeout_s)`` returns the tasks that arrive within timeout_s (0: only those queued
    now; an empty list when none).
    """
    tasks = list(first)
    residues = sum(t.residues for t in tasks)
    deadline = time.monotonic() + wait_s
    while tasks and residues < budget:
        got = more(max(0.0, deadline - time.monotonic()))
        if not got:
            break
        tasks += got
        residues += sum(t.residues for t in got)
    return tasks


@dataclass
class WorkerState:
    """What readiness reports: which levels are loaded and warmed (written by the Worker only)."""

    name: str  # worker id
    levels: int  # levels in the chain
    loaded: list[bool] = field(default_factory=list)  # weights resident per level
    ready: list[bool] = field(default_factory=list)  # warmed per level
    running: bool = False  # loop alive
    error: str | None = None  # fatal start-up error (e.g. weights unavailable)

    def __post_init__(self) -> None:
        self.loaded = [False] * self.levels
        self.ready = [False] * self.levels


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
    """Runs tasks from a source through an Embedder."""

    def __init__(
        self,
        embedder: Embedder,
        source: TaskSource,
        name: str,
        batch_wait_s: float,
    ) -> None:
        self.embedder = embedder
        self.source = source
        # Drain up to several batches of queued work per turn: planning them together sorts
        # all their sequences by length (less padding), and iter_compute still answers each
        # task when its own batch is done.
        self.drain_residues = DRAIN_BATCHES * embedder.token_budget
        self.wait_s = batch_wait_s
        self.artifact_sha = embedder.artifact.sha256
        self.level_names = [lv.name for lv in embedder.artifact.levels]
        self.state = WorkerState(name, len(self.level_names))
        self.last_turn = time.time()  # unix time of the last loop turn (liveness)
        self._stop = threading.Event()

    # -- start-up -------------------------------------------------------------------------------
    def prepare(self, warmup: bool = True) -> None:
        """Get ready to serve: with ``warmup``, load each level (smallest first) and run a tiny
        batch through it, readiness growing level by level; without, every level counts as
        ready and loads on first use.  A failure is recorded in the state, then re-raised."""
        try:
            for lvl, name in enumerate(self.level_names):
                if not warmup:
                    self.state.ready[lvl] = True
                    continue
                t0 = time.perf_counter()
                self.embedder.warm(lvl)
                m.MODEL_LOAD.labels(name).set(time.perf_counter() - t0)
                self.state.loaded[lvl] = self.state.ready[lvl] = True
                m.MODEL_LOADED.labels(name).set(1)
                freeze_heap()
                log.info(
                    "level ready",
                    extra={"model_level": name, "load_s": round(time.perf_counter() - t0, 3)},
                )
        except Exception as e:
            self.state.error = str(e)
            raise

    # -- loop -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the tasks taken in the current turn, then leave the loop."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Serve until stop(); each turn drains a batch of tasks and processes it."""
        self.state.running = True
        m.WORKER_UP.set(1)
        try:
            while not self._stop.is_set():
                self.last_turn = time.time()
                m.WORKER_HEARTBEAT.set(self.last_turn)
                try:
                    tasks = self.source.take(self.drain_residues, self.wait_s)
                except Exception:  # a queue hiccup must not end the worker
                    log.exception("taking tasks failed; retrying")
                    self._stop.wait(1.0)
                    continue
                if tasks:
                    self.process(tasks)
        finally:
            self.state.running = False
            m.WORKER_UP.set(0)

    def process(self, tasks: list[Task]) -> None:
        """Compute every item of the tasks, grouped by the chain segment they need.

        Between batches the worker drops tasks that were withdrawn or passed their deadline
        (rate-limited to WITHDRAW_CHECK_S): a group whose members change is planned again
        without them, so a drain of tasks nobody waits for any more is not computed.
        """
        now = time.time()
        live: list[Task] = []
        for task in tasks:
            if task.deadline < now:
                self._answer(task, _timed_out(task))
            elif task.artifact != self.artifact_sha:  # never routed here; kept as a guard
                self._answer(
                    task,
                    TaskResult(
                        task.id,
                        code="artifact_mismatch",
                        error=f"worker serves artifact {self.artifact_sha[:12]}, task needs "
                        f"{task.artifact[:12]}",
                    ),
                )
            else:
                live.append(task)
        _Turn(self, live).run()

    def _answer(self, task: Task, result: TaskResult) -> None:
        result.worker = self.state.name
        try:
            self.source.reply(task, result)
        except Exception:
            log.exception("reply failed", extra={"task": task.id})


def _timed_out(task: Task) -> TaskResult:
    return TaskResult(task.id, error="deadline passed before compute", code="timeout")


Segment = tuple[Pooling, LongSequencePolicy, int, int]  # pooling, policy, first and last level


class _Turn:
    """One worker turn over the tasks it drained: level groups smallest-k first, each task
    answered when its last item is done, closed tasks (answered, failed, withdrawn, expired)
    no longer computed."""

    def __init__(self, worker: Worker, live: list[Task]) -> None:
        self.w, self.live = worker, live
        self.groups: dict[Segment, list[tuple[int, int]]] = defaultdict(list)
        for j, task in enumerate(live):
            for i, it in enumerate(task.items):
                self.groups[(task.pooling, task.policy, it.start, it.stop)].append((j, i))
        self.results: list[list[ItemResult | None]] = [[None] * len(t.items) for t in live]
        self.pending = [len(t.items) for t in live]
        self.closed = [False] * len(live)
        self._checked = time.monotonic()

    def run(self) -> None:
        for key in sorted(self.groups, key=lambda g: (g[3], g[2])):
            while self._compute(key):  # True: members were closed mid-group; plan the rest
                pass

    def _open_members(self, key: Segment) -> list[tuple[int, int]]:
        return [
            (j, i) for j, i in self.groups[key] if not self.closed[j] and self.results[j][i] is None
        ]

    def _prune(self) -> bool:
        """Close withdrawn and expired tasks (at most every WITHDRAW_CHECK_S); True if any."""
        if time.monotonic() - self._checked < WITHDRAW_CHECK_S:
            return False
        self._checked = time.monotonic()
        open_ = [j for j in range(len(self.live)) if not self.closed[j]]
        if not open_:
            return False
        try:
            gone = self.w.source.withdrawn([self.live[j] for j in open_])
        except Exception as e:  # noqa: BLE001 — cannot tell (Redis restarting?): keep computing
            log.warning("withdrawal check failed", extra={"error": repr(e)})
            gone = set()
        now, dropped = time.time(), 0
        for j in open_:
            task = self.live[j]
            if task.id in gone:
                m.TASKS_SKIPPED.labels("withdrawn").inc()
                self.w.source.skip(task)
            elif task.deadline < now:
                m.TASKS_SKIPPED.labels("deadline").inc()
                self.w._answer(task, _timed_out(task))
            else:
                continue
            self.closed[j] = True
            dropped += 1
        if dropped:
            log.info("dropped tasks nobody waits for", extra={"tasks": dropped})
        return dropped > 0

    def _compute(self, key: Segment) -> bool:
        """Run the group's open items; True when it stopped early to plan again."""
        self._prune()
        members = self._open_members(key)
        if not members:
            return False
        pooling, policy, start, stop = key
        live, results = self.live, self.results
        items = [live[j].items[i] for j, i in members]
        batches = self.w.embedder.iter_compute(
            [it.seq for it in items],
            stop=stop,
            start=start,
            pooling=pooling,
            policy=policy,
            prefixes=[it.prefix for it in items] if start > 0 else None,
            observer=observe_forward(self.w.level_names, start),
        )
        try:
            # Batches are length-sorted over every drained task; a task is answered as soon
            # as the batch holding its last item is done, not when the whole drain is.
            for done in batches:
                for k, r in done:
                    j, i = members[k]
                    if isinstance(r, ItemFailure):  # failed even alone: only this item
                        code = "out_of_memory" if r.out_of_memory else "compute_failed"
                        m.ITEM_FAILURES.labels(code).inc()
                        results[j][i] = ItemResult.failure(r.message, code)
                    else:
                        results[j][i] = ItemResult(
                            [np.asarray(b, dtype=np.float32) for b in r.blocks],
                            r.residues,
                            r.handling,
                        )
                    self.pending[j] -= 1
                    if self.pending[j] == 0 and not self.closed[j]:
                        self.closed[j] = True
                        done_items: list[ItemResult] = results[j]  # type: ignore[assignment]
                        self.w._answer(live[j], TaskResult(live[j].id, items=done_items))
                if self._prune() and any(self.closed[j] for j, _ in self._unfinished(members)):
                    batches.close()
                    return True
        except Exception as e:  # answer the affected tasks, keep serving
            log.exception("compute failed")
            for j in {j for j, _ in members if self.pending[j] > 0 and not self.closed[j]}:
                self.closed[j] = True
                self.w._answer(
                    live[j],
                    TaskResult(live[j].id, error=f"compute failed: {e}", code="internal"),
                )
        return False

    def _unfinished(self, members: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(j, i) for j, i in members if self.results[j][i] is None]
