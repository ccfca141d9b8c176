"""Applying a fitted chain on device, block by block."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from models.artifact import Artifact


class Projector:
    """Computes RD blocks from raw level outputs with the artifact's steps, fused.

    Step i's appended block a = (x − W(h − m_h) − m_x − μ) Vᵀ is rewritten as

        a = x Aᵀ + h Bᵀ + c,   A = V,  B = −V W,  c = V (W m_h − m_x − μ)

    (folded in float64, applied in float32) so a row costs d_out·k + d_in·k multiply-adds
    instead of d_out·d_in + d_out·k.  Every step is affine, so applying it to mean-pooled raw
    outputs gives exactly the mean of the per-residue RD embeddings: pooled requests project
    once per sequence.
    """

    def __init__(self, artifact: Artifact, device: torch.device | str = "cpu") -> None:
        self.dims = artifact.dims
        self.device = torch.device(device)
        self._a: list[torch.Tensor] = []
        self._b: list[torch.Tensor] = []
        self._c: list[torch.Tensor] = []
        for s in artifact.steps:
            v, w = s.components, s.weight
            fused = {
                "a": v.T,
                "b": -(v @ w).T,
                "c": v @ (w @ s.input_mean - s.output_mean - s.residual_mean),
            }
            t = {
                k: torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32, device=self.device)
                for k, x in fused.items()
            }
            self._a.append(t["a"])
            self._b.append(t["b"])
            self._c.append(t["c"])

    def block(self, step: int, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Appended block of step ``step`` (level step → step+1); rows h (·, d_in), x (·, d_out)."""
        return torch.addmm(self._c[step], x, self._a[step]).addmm_(h, self._b[step])

    def extend(
        self,
        prefix: torch.Tensor | None,
        raw: Mapping[int, torch.Tensor],
        start: int,
        stop: int,
    ) -> list[torch.Tensor]:
        """RD blocks of levels start … stop (inclusive) given the known prefix h_{start−1}.

        ``prefix`` holds the first dims[start−1] RD dims of each row (None when start == 0);
        ``raw[level]`` the raw outputs of each level to compute.  Block 0 is x_1 itself.
        """
        blocks: list[torch.Tensor] = []
        h = prefix
        for level in range(start, stop + 1):
            x = raw[level]
            if level == 0:
                blk = x
                h = x
            else:
                assert h is not None, "a prefix is required when start > 0"
                blk = self.block(level - 1, h, x)
                h = torch.cat([h, blk], dim=1) if level < stop else h
            blocks.append(blk)
        return blocks
