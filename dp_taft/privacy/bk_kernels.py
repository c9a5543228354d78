"""Book-keeping's tensor kernels: per-example squared norms of A_iᵀG_i and the weighted clipped sum.

Bu, Wang, Zha, Karypis, *Differentially Private Optimization on Large Model at Small Cost*
(ICML 2023): for a linear layer with input A_i (T, d_in) and output gradient G_i (T, d_out)
of example i, ‖A_iᵀG_i‖² = ⟨A_iA_iᵀ, G_iG_iᵀ⟩ (ghost norm) and Σ_i w_i A_iᵀG_i as one
matmul over all B·T rows. Every kernel works in batch chunks so no temporary exceeds
:data:`CHUNK_ELEMENTS` elements.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

__all__ = ["CHUNK_ELEMENTS", "norm_method", "by_chunks", "ghost_sq", "direct_sq", "weighted_gram", "flat"]

#: Largest temporary (elements) a norm or clipped-sum chunk may allocate; the batch is split to fit.
CHUNK_ELEMENTS = 1 << 24

def norm_method(tokens: int, d_in: int, d_out: int) -> str:
    """"ghost" or "direct": the cheaper way to get ‖A_iᵀG_i‖² for one example.

    Ghost forms two T×T Gram matrices, T²·(d_in + d_out) multiply-adds; direct forms the
    d_out×d_in per-example gradient, T·d_in·d_out. Ghost wins iff T·(d_in+d_out) <= d_in·d_out.
    """
    return "ghost" if tokens * (d_in + d_out) <= d_in * d_out else "direct"


def _chunks(total: int, per_item: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(per_item, 1))
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


def by_chunks(fn: Callable[..., torch.Tensor], per_item: int, *tensors: torch.Tensor) -> torch.Tensor:
    """fn over batch chunks of ``tensors`` (at most CHUNK_ELEMENTS temporaries each), results concatenated."""
    parts = [fn(*(t[s] for t in tensors)) for s in _chunks(tensors[0].shape[0], per_item)]
    return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else tensors[0].new_zeros(0)


def ghost_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖A_iᵀG_i‖² = ⟨A_iA_iᵀ, G_iG_iᵀ⟩ for every example i of the chunk."""
    gram_a = torch.bmm(a, a.transpose(1, 2)).flatten(1)
    return torch.linalg.vecdot(gram_a, torch.bmm(g, g.transpose(1, 2)).flatten(1)).clamp_(min=0)


def direct_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖A_iᵀG_i‖² from the chunk's per-example gradients."""
    per_example = torch.bmm(g.transpose(1, 2), a).flatten(1)
    return torch.linalg.vecdot(per_example, per_example)


def weighted_gram(g: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i G_iᵀ A_i (d_out, d_in) as matmuls over the B·M rows, scaling the narrower side."""
    b, m, d_in = a.shape
    d_out = g.shape[2]
    out = None
    for s in _chunks(b, m * min(d_in, d_out)):
        ws = w[s, None, None]
        if d_out <= d_in:
            left, right = (g[s] * ws).reshape(-1, d_out).T, a[s].reshape(-1, d_in)
        else:
            left, right = g[s].reshape(-1, d_out).T, (a[s] * ws).reshape(-1, d_in)
        out = torch.mm(left, right) if out is None else out.addmm_(left, right)
    return a.new_zeros(d_out, d_in) if out is None else out


def flat(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) -> (B, M, d), M the product of the middle dimensions (1 for (B, d))."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])
