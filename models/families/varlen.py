"""Variable-length attention over packed (unpadded) batches, for Hugging Face encoders.

A packed batch is one row of T tokens holding several sequences back to back; ``cu_seqlens``
(S + 1,) gives where each starts (cu[0] = 0, cu[S] = T) and every token attends only within its
own sequence.  Nothing is padded but the tail that rounds T up to a bucket (itself split into
sequences of its own), so the linear layers, most of the FLOPs, see no padding at all.

The attention runs as one custom op, opaque to ``torch.compile`` (no graph breaks, no
recompilation for the number of sequences):
  * CUDA, bf16/fp16: FlashAttention's varlen kernel (``torch.nn.attention.varlen.varlen_attn``);
  * otherwise (CPU, fp32 on CUDA): SDPA per sequence on views of the packed tensor.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ATTN_IMPLEMENTATION", "flash_varlen_available", "register", "varlen_attention"]

#: The name the attention is registered under in transformers' AttentionInterface.
ATTN_IMPLEMENTATION = "rdserve_varlen"


def flash_varlen_available(q: torch.Tensor) -> bool:
    """Whether FlashAttention's varlen kernel serves this query (CUDA, half precision)."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401 — PyTorch ≥ 2.9
    except ImportError:
        return False
    return True


@torch.library.custom_op("rdserve::varlen_attention", mutates_args=())
def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    scale: float,
) -> torch.Tensor:
    """softmax(scale · q_s k_sᵀ) v_s for each sequence s of a packed row; q, k, v (1, H, T, D).

    Returns (1, T, H, D), contiguous: the layout transformers' attention functions return.
    ``max_len`` bounds the longest sequence (the flash kernel sizes its grid by it).
    """
    if flash_varlen_available(q):
        from torch.nn.attention.varlen import varlen_attn

        cu = cu_seqlens.to(torch.int32)
        # (1, H, T, D) → (T, H, D), the kernel's packed layout.
        qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))
        out = varlen_attn(qt, kt, vt, cu, cu, max_len, max_len, scale=scale)
        return out.unsqueeze(0)
    bounds = cu_seqlens.tolist()
    parts = [
        F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=scale
        )  # 4-d views: SDPA's fast CPU path, no copies
        for a, b in itertools.pairwise(bounds)
        if b > a
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()


@varlen_attention.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    scale: float,
) -> torch.Tensor:
    batch, heads, tokens, dim = q.shape
    return q.new_empty((batch, tokens, heads, dim))


def hf_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over a packed row (batch size 1).

    The boundaries come in as the model call's ``cu_seq_lens_q`` / ``max_length_q`` keyword
    arguments, which transformers passes down to every attention layer.
    """
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("varlen attention takes one packed row and no attention mask")
    # ESM passes 1.0: it scales the query itself, before the rotary embedding.
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    cu, max_len = kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"])
    out = varlen_attention(query, key, value, cu, max_len, scale)
    return out, None


def register() -> str:
    """Register the attention with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, hf_attention)
    return ATTN_IMPLEMENTATION
