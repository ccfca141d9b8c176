"""One worker turn over the tasks it drained: level groups smallest-k first, each task answered
when its last item is done, closed tasks (answered, failed, withdrawn, expired) no longer
computed, and — in a turn of bulk-job chunks — interactive tasks served between batches."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from app import metrics as m
from app.core.tasks import ItemResult, Task, TaskResult
from models.blocks import ItemFailure
from models.sequences import LongSequencePolicy, Pooling

if TYPE_CHECKING:
    from collections.abc import Callable

    from app.core.worker import Worker
    from models.extract import ForwardStats

log = logging.getLogger(__name__)

#: Between batches, how often the worker asks whether a task it holds was withdrawn (its request
#: gave up: timeout, client gone, the API's shutdown window) or is past its deadline.
WITHDRAW_CHECK_S = 0.25


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


Segment = tuple[Pooling, LongSequencePolicy, int, int]  # pooling, policy, first and last level


class Turn:
    """The tasks of one drain, computed group by group."""

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
        self.bulk = any(t.bulk for t in live)  # bulk chunks: interactive tasks may cut in

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
                self.w._answer(task, timed_out(task))
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
                self._serve_urgent()
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

    def _serve_urgent(self) -> None:
        """In a bulk turn, run the interactive tasks queued meanwhile now (a nested turn of their
        own), so that a request waits at most about one batch behind a bulk job."""
        if not self.bulk:
            return
        try:
            urgent = self.w.source.urgent(self.w.drain_residues)
        except Exception as e:  # noqa: BLE001 — they will be taken at the next turn instead
            log.warning("urgent-task check failed", extra={"error": repr(e)})
            return
        if urgent:
            m.BULK_YIELDS.inc()
            self.w.process(urgent)

    def _unfinished(self, members: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(j, i) for j, i in members if self.results[j][i] is None]


def timed_out(task: Task) -> TaskResult:
    return TaskResult(task.id, error="deadline passed before compute", code="timeout")
