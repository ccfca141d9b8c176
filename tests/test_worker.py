"""The worker loop's scheduling: small-k jobs first, answers as soon as their batch is done."""

from __future__ import annotations

import time

import pytest

from app.core.tasks import WorkItem
from app.core.worker import Worker
from models.artifact import load_artifact
from models.embedder import Embedder
from models.families import build_chain
from tests.helpers import make_task


class ListSource:
    """A JobSource over a fixed list that records every event in order."""

    def __init__(self, jobs, events):
        self.jobs, self.events = list(jobs), events

    def take(self, budget, wait_s):
        jobs, self.jobs = self.jobs, []
        return jobs

    def reply(self, job, result):
        self.events.append(("reply", job.id, result.error))

    def withdrawn(self, jobs):
        return set()

    def skip(self, job):
        self.events.append(("skip", job.id))


@pytest.fixture
def worker_and_events(tiny_artifact):
    art = load_artifact(tiny_artifact)
    family = build_chain("esm2", levels=list(art.levels), device="cpu")
    events: list[tuple] = []
    inner = family.forward

    def forward(level, batch):  # record which level runs when, then run it for real
        events.append(("forward", level, batch.input_ids.shape[0]))
        return inner(level, batch)

    family.forward = forward
    embedder = Embedder(family, art, token_budget=64)  # tiny budget: one sequence per batch

    def make(jobs):
        source = ListSource(jobs, events)
        return Worker(embedder, source, "w", 0.0), source

    return make, events, art


def job(id_, art, seqs, stop, deadline=None):
    return make_task(id_, art.sha256, [WorkItem(s, 0, stop) for s in seqs], deadline)


def test_small_k_tasks_are_answered_before_larger_models_run(worker_and_events):
    make, events, art = worker_and_events
    big = job("big", art, ["MKTAYIAKQRQ", "GSHMLEDPV"], stop=2)
    small = job("small", art, ["MVLSPADKTNV"], stop=0)
    w, source = make([big, small])
    w.process(source.take(0, 0))
    first_big_forward = next(i for i, e in enumerate(events) if e[0] == "forward" and e[1] > 0)
    assert events.index(("reply", "small", None)) < first_big_forward
    assert ("reply", "big", None) in events


def test_a_task_is_answered_when_its_own_batch_is_done(worker_and_events):
    make, events, art = worker_and_events
    # Two single-sequence jobs, drained together, planned together (longest first), run as
    # separate batches: the first job's reply must precede the second batch's forward.
    a = job("long", art, ["M" * 40], stop=0)
    b = job("short", art, ["M" * 10], stop=0)
    w, source = make([a, b])
    w.process(source.take(0, 0))
    kinds = [e[:2] for e in events]
    assert kinds == [("forward", 0), ("reply", "long"), ("forward", 0), ("reply", "short")]


def test_expired_and_foreign_tasks_are_refused_not_computed(worker_and_events):
    make, events, art = worker_and_events
    old = job("old", art, ["MKV"], stop=0, deadline=time.time() - 1)
    alien = make_task("alien", "0" * 64, [WorkItem("MKV", 0, 0)], time.time() + 60)
    w, source = make([old, alien])
    w.process(source.take(0, 0))
    assert [e[0] for e in events] == ["reply", "reply"]
    assert "deadline" in events[0][2] and "artifact" in events[1][2]
