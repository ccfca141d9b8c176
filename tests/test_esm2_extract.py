"""ESM-2 family through the real transformers code path, with tiny random weights."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from models.extract import Extractor, Pooling
from models.families import WeightsUnavailableError, build_chain
from models.families.esm2 import ESM2_PRESETS, ESM2Family
from models.sequences import Handling, LongSequencePolicy, SequenceError
from tests.helpers import random_protein


@pytest.fixture(scope="module")
def family(tiny_esm_dirs):
    return build_chain("esm2", models=[str(p) for p in tiny_esm_dirs], device="cpu")


def reference_forward(family, level: int, seq: str) -> torch.Tensor:
    """One unpadded sequence through the HF tokenizer + model: (L + 2, d)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family.levels[0].model_id)
    ids = torch.tensor([tok(seq)["input_ids"]])
    with torch.inference_mode():
        return family.load(level)(input_ids=ids).last_hidden_state[0]


def test_levels_resolve_from_local_configs_and_presets(family, tiny_esm_dirs):
    assert [lv.dim for lv in family.levels] == [32, 48, 64]
    assert family.levels[0].model_id == str(tiny_esm_dirs[0])
    lv = ESM2Family.resolve_levels(["8M", "facebook/esm2_t33_650M_UR50D"], revision="abc")
    assert [(x.name, x.dim, x.model_id, x.revision) for x in lv] == [
        ("8M", 320, ESM2_PRESETS["8M"][0], "abc"),
        ("650M", 1280, "facebook/esm2_t33_650M_UR50D", "abc"),
    ]


def test_models_load_lazily(tiny_esm_dirs):
    fam = build_chain("esm2", models=[str(p) for p in tiny_esm_dirs], device="cpu")
    ex = Extractor(fam, 1024)
    plans, _ = ex.plan(["MKV"])
    ex.run(plans[0], [0], Pooling.mean)
    assert [fam.is_loaded(i) for i in range(3)] == [True, False, False]


def test_table_tokenizer_equals_hf_tokenizer(family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family.levels[0].model_id)
    rng = random.Random(0)
    seqs = [random_protein(rng, 1, 30) + "XBZUO" for _ in range(5)]
    batch = family.encode(seqs)
    for row, s in enumerate(seqs):
        want = tok(s)["input_ids"]
        assert batch.input_ids[row, : len(want)].tolist() == want
        assert batch.attention_mask[row].sum().item() == len(want)
        assert batch.residue_mask[row].sum().item() == len(s)


def test_batched_padded_extraction_equals_single_sequence_forward(family):
    rng = random.Random(1)
    seqs = [random_protein(rng, 5, 90) for _ in range(9)]
    ex = Extractor(family, token_budget=200)  # forces several batches of mixed lengths
    plans, handling = ex.plan(seqs)
    assert len(plans) > 2 and set(handling) == {Handling.full}
    pooled: dict[int, np.ndarray] = {}
    per_res: dict[int, np.ndarray] = {}
    bos: dict[int, np.ndarray] = {}
    for p in plans:
        m = ex.run(p, [1], Pooling.mean).levels[1].numpy()
        r = ex.run(p, [1], Pooling.per_residue).levels[1].numpy()
        b = ex.run(p, [1], Pooling.bos).levels[1].numpy()
        cuts = np.cumsum(p.lengths)[:-1]
        for row, (i, chunk) in enumerate(zip(p.items, np.split(r, cuts), strict=True)):
            pooled[i], per_res[i], bos[i] = m[row], chunk, b[row]
    for i, s in enumerate(seqs):
        ref = reference_forward(family, 1, s).numpy()
        np.testing.assert_allclose(per_res[i], ref[1:-1], atol=1e-5)
        np.testing.assert_allclose(pooled[i], ref[1:-1].mean(0), atol=1e-5)
        np.testing.assert_allclose(bos[i], ref[0], atol=1e-5)


def test_long_sequence_policies(family):
    rng = random.Random(2)
    long = random_protein(rng, 1500, 1500)
    short = random_protein(rng, 40, 40)
    ex = Extractor(family, token_budget=4096, chunk_overlap=200)
    with pytest.raises(
        SequenceError, match="sequence 1: length 1500 exceeds the model context of 1022"
    ):
        ex.plan([short, long], LongSequencePolicy.error)

    plans, how = ex.plan([short, long], LongSequencePolicy.truncate)
    assert how == [Handling.full, Handling.truncated]
    out = {i: None for i in range(2)}
    for p in plans:
        r = ex.run(p, [0], Pooling.per_residue)
        cuts = np.cumsum(r.lengths)[:-1]
        for i, chunk in zip(p.items, np.split(r.levels[0].numpy(), cuts), strict=True):
            out[i] = chunk
    assert out[1].shape == (1022, 32)
    np.testing.assert_allclose(out[1], reference_forward(family, 0, long[:1022])[1:-1], atol=1e-4)

    plans, how = ex.plan([short, long], LongSequencePolicy.chunk)
    assert how == [Handling.full, Handling.chunked]
    (plan,) = [p for p in plans if 1 in p.items]
    row = plan.items.index(1)
    r = ex.run(plan, [0], Pooling.per_residue)
    cuts = np.cumsum(r.lengths)[:-1]
    got = np.split(r.levels[0].numpy(), cuts)[row]
    mean = ex.run(plan, [0], Pooling.mean).levels[0].numpy()[row]
    # Expected: windows [0, 1022) and [478, 1500), averaged on the overlap [478, 1022).
    w1 = reference_forward(family, 0, long[:1022])[1:-1].numpy()
    w2 = reference_forward(family, 0, long[478:])[1:-1].numpy()
    want = np.zeros((1500, 32))
    cnt = np.zeros((1500, 1))
    want[:1022] += w1
    cnt[:1022] += 1
    want[478:] += w2
    cnt[478:] += 1
    want /= cnt
    assert got.shape == (1500, 32)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(mean, want.mean(0), atol=1e-5)


def test_bos_needs_a_start_token(family, monkeypatch):
    ex = Extractor(family, 1024)
    plans, _ = ex.plan(["MKV"])
    monkeypatch.setattr(ESM2Family, "has_bos", False)
    with pytest.raises(ValueError, match="no start token"):
        ex.run(plans[0], [0], Pooling.bos)


def test_unreachable_hub_gives_a_clear_error(monkeypatch, tmp_path):
    # The hub cannot be reached from CI: force offline mode so the failure is immediate
    # (huggingface_hub reads HF_HUB_OFFLINE at import time, hence the constant).
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    fam = build_chain("esm2", models=["8M", "35M"], device="cpu")
    with pytest.raises(WeightsUnavailableError) as ei:
        fam.load(0)
    msg = str(ei.value)
    assert "facebook/esm2_t6_8M_UR50D" in msg and "local model directories" in msg
    assert "RDSERVE_FAMILY=unirep" in msg


def test_pickled_checkpoints_are_refused(tiny_esm_dirs, tmp_path):
    """Weights load from safetensors only: a pytorch_model.bin (a pickle) is never unpickled."""
    import shutil

    from transformers import EsmForMaskedLM

    src = tiny_esm_dirs[0]
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    state = EsmForMaskedLM.from_pretrained(src).state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    fam = build_chain("esm2", models=[str(tmp_path)], device="cpu")
    with pytest.raises(WeightsUnavailableError, match="only from safetensors"):
        fam.load(0)
    # The same weights as safetensors load fine.
    assert build_chain("esm2", models=[str(src)], device="cpu").load(0) is not None
