"""Applying a fitted chain on device, block by block."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from models.artifact import Artifact


class Projector:
    """Computes RD blocks from raw level outputs with the artifact's steps, centred.

    Step i's appended block a = (x − W(h − m_h) − m_x − μ) Vᵀ is applied as

        r = (x − m̃_x) − (h − m_h) Wᵀ,   a = r Vᵀ,   m̃_x = m_x + μ

    in float32, on the device of the model.  The order matters: x and the prediction
    W(h − m_h) + m̃_x nearly cancel (the regression explains most of x), and here they cancel
    in one elementwise subtraction of centred values.  Folding the chain into
    a = x Aᵀ + h Bᵀ + c (A = V, B = −VW, c = V(W m_h − m_x − μ)) makes the cancellation happen
    between whole float32 dot products and their ~5-sized constant instead: appended blocks 2–8×
    less precise (tests/test_fastpath.py), to save d_in·(d_out − k) multiply-adds per row, a
    fraction of a percent of the forward pass.  Every step is affine, so applying it to
    mean-pooled raw outputs gives exactly the mean of the per-residue RD embeddings: pooled
    requests project once per sequence.
    """

    def __init__(self, artifact: Artifact, device: torch.device | str = "cpu") -> None:
        self.dims = artifact.dims
        self.device = torch.device(device)
        self._wt: list[torch.Tensor] = []  # Wᵀ (d_in, d_out)
        self._vt: list[torch.Tensor] = []  # Vᵀ (d_out, k)
        self._mx: list[torch.Tensor] = []  # m̃_x = m_x + μ (d_out,)
        self._mh: list[torch.Tensor] = []  # m_h (d_in,)
        for s in artifact.steps:
            for dest, x in (
                (self._wt, s.weight.T),
                (self._vt, s.components.T),
                (self._mx, s.output_mean + s.residual_mean),  # summed in float64
                (self._mh, s.input_mean),
            ):
                dest.append(
                    torch.as_tensor(
                        np.ascontiguousarray(x), dtype=torch.float32, device=self.device
                    )
                )

    def block(
        self, step: int, h: torch.Tensor, x: torch.Tensor, cols: int | None = None
    ) -> torch.Tensor:
        """Appended block of step ``step`` (level step → step+1); rows h (·, d_in), x (·, d_out).

        a = ((x − m̃_x) − (h − m_h) Wᵀ) Vᵀ; ``cols`` keeps only the first columns of a (the k
        dims a request asked for) and skips their share of the last product.
        """
        r = torch.addmm(x - self._mx[step], h - self._mh[step], self._wt[step], alpha=-1)
        vt = self._vt[step] if cols is None else self._vt[step][:, :cols]
        return r @ vt

    def extend(
        self,
        prefix: torch.Tensor | None,
        raw: Mapping[int, torch.Tensor],
        start: int,
        stop: int,
        keep: int | None = None,
    ) -> list[torch.Tensor]:
        """RD blocks of levels start … stop (inclusive) given the known prefix h_{start−1}.

        ``prefix`` holds the first dims[start−1] RD dims of each row (None when start == 0);
        ``raw[level]`` the raw outputs of each level to compute.  Block 0 is x_1 itself.
        ``keep`` (dims[stop−1] < keep ≤ dims[stop]) truncates the last block so that the RD
        embedding ends at ``keep`` dims.
        """
        blocks: list[torch.Tensor] = []
        h = prefix
        for level in range(start, stop + 1):
            x = raw[level]
            cols = None
            if keep is not None and level == stop:
                cols = keep - (self.dims[level - 1] if level else 0)
            if level == 0:
                blk = x if cols is None else x[:, :cols]
                h = x
            else:
                assert h is not None, "a prefix is required when start > 0"
                blk = self.block(level - 1, h, x, cols)
                h = torch.cat([h, blk], dim=1) if level < stop else h
            blocks.append(blk)
        return blocks
