"""A short soak with its fault events: two APIs and four workers over one Redis (two artifacts),
mixed valid and invalid traffic from 16 clients, a worker killed and restarted under its id, and
a change of artifact mid-run; every response checked against its request and its artifact
(benchmarks/soak.py).  Timings and memory growth are not asserted here: they are measured by
`benchmarks/run soak`."""

from __future__ import annotations

from benchmarks.soak import KINDS, soak


def test_short_soak_answers_every_request_correctly(tiny_artifact, tiny_artifact_b, tmp_path):
    res = soak(
        tiny_artifact,
        clients=16,
        duration=12,
        pool_size=150,
        per_residue_pool=60,
        logs=tmp_path,
        next_artifact=tiny_artifact_b,
        next_workers=1,
    )
    assert res["crashed"] == {}, res["log_errors"]
    totals = res["totals"]
    assert (totals["5xx"], totals["lost"], totals["mismatched"]) == (0, 0, 0), res["failures"]
    assert res["ready_after"] == 200
    # The events ran, and what was stopped on purpose stopped cleanly (the restarted a1 may
    # still be loading when it is stopped: then SIGTERM's default action ends it, -15).
    assert len(res["events"]) == 4, res["events"]
    assert {res["stopped"][n] for n in ("api-a", "a1", "a2")} <= {0, -15}, res["stopped"]
    # 16 clients open with one request of each kind: every kind was sent and passed its checks.
    assert len(KINDS) <= 16
    assert {k: v["checked"] > 0 for k, v in res["kinds"].items()} == {k: True for k in KINDS}
    assert totals["statuses"].keys() == {"200", "400"}
