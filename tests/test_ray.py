"""Cluster-scale offline runs on Ray Data: a real local Ray (ray.init(num_cpus=2)), the real
embedder in an actor pool, Parquet shards equal to `rdserve embed`, resumed by shard."""

from __future__ import annotations

import random

import numpy as np
import pytest

from app.offline.ray_data import RunOptions, read_output, run
from models.artifact import load_artifact
from tests.helpers import random_protein
from tests.procs import rdserve

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_shards_equal_rdserve_embed_and_resume_by_shard(local_ray, tiny_artifact, tmp_path):
    rng = random.Random(5)
    recs = [(f"p{i}", random_protein(rng, 30, 200)) for i in range(90)]
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{name} a protein\n{seq}\n" for name, seq in recs))
    out = str(tmp_path / "out")
    opts = RunOptions(
        artifact=str(tiny_artifact),
        artifact_sha256=load_artifact(tiny_artifact).sha256,
        dimensions=48,
        shard_records=25,
    )
    first = run(fasta, out, opts, actors=2, device="cpu")
    assert first.shards == 4 and first.ran == [0, 1, 2, 3] and first.records == 90
    got = read_output(out)
    assert list(got) == [name for name, _ in recs]

    p = rdserve(
        "embed",
        "--artifact",
        str(tiny_artifact),
        "--fasta",
        str(fasta),
        "--dimensions",
        "48",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "local.npz"),
        env={"OMP_NUM_THREADS": "1"},
        log=tmp_path / "embed.log",
    )
    assert p.wait(120) == 0, p.output()
    with np.load(tmp_path / "local.npz") as local:
        for name, _ in recs:
            np.testing.assert_allclose(got[name], local[name], rtol=1e-4, atol=1e-5)

    # A lost shard (a crashed actor's, say) is all a second run computes.
    (tmp_path / "out" / "part-00002.parquet").unlink()
    again = run(fasta, out, opts, actors=2, device="cpu")
    assert again.ran == [2]
    resumed = read_output(out)
    for name in got:
        np.testing.assert_array_equal(resumed[name], got[name])
    with pytest.raises(ValueError, match="other options"):
        run(fasta, out, RunOptions(**{**opts.__dict__, "dimensions": 32}), actors=1)
