"""The capacity model of docs/scaling.md (benchmarks/capacity.py) on the committed measurements:
its arithmetic agrees with itself and with the simulation (a small fleet, a few seconds)."""

from __future__ import annotations

import pytest

from benchmarks import capacity as cap


@pytest.fixture(scope="module")
def inputs():
    return cap._load(cap.GPU_JSON), cap._load(cap.OPS_JSON)


def test_levels_and_gpu_counts(inputs):
    gpu, _ = inputs
    assert cap.levels_for(640) == ["8M", "35M", "150M"]
    assert cap.levels_for(641) == ["8M", "35M", "150M", "650M"]
    with pytest.raises(ValueError, match="above the largest"):
        cap.levels_for(5000)
    # k = 1280 runs one more model per residue than k = 640: more GPUs, never fewer.
    assert cap.gpus_needed(gpu, 1000, 1280) > cap.gpus_needed(gpu, 1000, 640) > 0
    assert cap.gpus_needed(gpu, 1000, 640, miss=0.5) == pytest.approx(
        cap.gpus_needed(gpu, 1000, 640) / 2
    )


def test_queue_redis_load_grows_with_the_fleet_and_the_fixes_cut_it(inputs):
    gpu, ops = inputs
    c = cap.costs_from(ops, 32)
    load = cap.Load(0.9 * cap.fleet_capacity(100, 640, 32, gpu), 640, 32)
    small = cap.utilisation(cap.Fleet(100, 10), load, c, gpu)
    big = cap.utilisation(cap.Fleet(1000, 10), load, c, gpu)
    # Same traffic, ten times the workers: the dead-worker checks grow with N² (N checks of N).
    assert big["queue_background"] > 50 * small["queue_background"]
    fixed = cap.utilisation(cap.Fleet(1000, 10, dead_check_per_fleet=True), load, c, gpu)
    assert fixed["queue_background"] < big["queue_background"] / 100
    sharded = cap.utilisation(
        cap.Fleet(1000, 10, dead_check_per_fleet=True, streams=4), load, c, gpu
    )
    assert sharded["queue_redis"] < fixed["queue_redis"]


def test_simulation_serves_a_small_fleet_below_capacity(inputs):
    gpu, ops = inputs
    c = cap.costs_from(ops, 32)
    fleet = cap.Fleet(4, 4)
    lam = 0.5 * cap.fleet_capacity(4, 640, 32, gpu)
    r = cap.simulate(fleet, cap.Load(lam, 640, 32), c, gpu, horizon_s=6.0, seed=1)
    assert r.served == pytest.approx(lam, rel=0.25)
    assert 0.3 < r.busy["gpu"] < 0.7  # about the offered half of the GPUs' capacity
    analytic = cap.utilisation(fleet, cap.Load(lam, 640, 32), c, gpu)
    assert r.busy["gpu"] == pytest.approx(analytic["gpu"], rel=0.3)
