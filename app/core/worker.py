"""The worker: one loop owns batching — drain queued tasks, run level groups, reply.

The same loop serves both modes; only the task source differs (an in-process queue in
embedded mode, a Redis Stream consumer group in distributed mode).  Tasks are grouped by the
chain segment they need (pooling, policy, first and last level), groups run smallest-k first,
and each task is answered as soon as all of its items are done: a k = 320 request never waits
for a 650M forward that only another request needs (``app.core.turn``). Bulk-job chunks are
taken only when no interactive task waits, and a turn of them lets interactive tasks that arrive
meanwhile run between its batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from app import metrics as m
from app.core.heap import freeze_heap
from app.core.tasks import Task, TaskResult
from app.core.turn import Turn, timed_out

if TYPE_CHECKING:  # torch-heavy; the worker receives a ready Embedder
    from models.embedder import Embedder

log = logging.getLogger(__name__)

DRAIN_BATCHES = 16  # token budgets of queued residues gathered per worker turn


class TaskSource(Protocol):
    """Where tasks come from and where answers go."""

    def take(self, budget: int, wait_s: float) -> list[Task]:
        """Block briefly for a first task, then gather more for up to wait_s or ~budget residues
        (implementations call :func:`gather`); interactive tasks first, bulk ones only when no
        interactive task is queued."""
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

    def urgent(self, budget: int) -> list[Task]:
        """Interactive tasks queued now, up to ~budget residues, without waiting: a turn of bulk
        tasks runs them between its batches (none: an empty list)."""
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
        (at most every ``app.core.turn.WITHDRAW_CHECK_S``): a group whose members change is
        planned again without them, so a drain of tasks nobody waits for is not computed.
        """
        now = time.time()
        live: list[Task] = []
        for task in tasks:
            if task.deadline < now:
                self._answer(task, timed_out(task))
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
        Turn(self, live).run()

    def _answer(self, task: Task, result: TaskResult) -> None:
        result.worker = self.state.name
        try:
            self.source.reply(task, result)
        except Exception:
            log.exception("reply failed", extra={"task": task.id})
