"""Pairwise squared distances between updates from one Gram matrix, and Krum scores.

‖a − b‖² = ‖a‖² + ‖b‖² − 2⟨a, b⟩: the K×K inner products come from one matrix product per tensor
key (`X @ Xᵀ` with X the K flattened tensors), summed in float64, instead of K² vector differences.
"""

from __future__ import annotations

import torch

from fedtune.aggregation.base import ClientUpdate
from fedtune.tensors import single_threaded


@single_threaded()
def squared_distances(updates: list[ClientUpdate]) -> torch.Tensor:
    """K×K float64 matrix of ‖Δi − Δj‖² over all tensors of the updates."""
    k = len(updates)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for key in updates[0].delta:
        x = torch.stack([u.delta[key].reshape(-1).to(torch.float32) for u in updates])
        gram += (x @ x.T).to(torch.float64)
    sq = gram.diagonal()
    d2 = sq[:, None] + sq[None, :] - 2 * gram
    d2.clamp_(min=0).fill_diagonal_(0)
    return d2


def krum_scores(d2: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Each update's summed squared distance to its K − f − 2 nearest others (Blanchard et al. 2017).

    Where K − f − 2 < 1 (a remnant set in Bulyan's selection) the nearest one neighbour counts.
    """
    k = d2.shape[0]
    nearest = min(max(k - byzantine - 2, 1), k - 1)
    if nearest < 1:
        return torch.zeros(k, dtype=d2.dtype)
    off = d2 + torch.diag(torch.full((k,), float("inf"), dtype=d2.dtype))
    return torch.topk(off, nearest, dim=1, largest=False).values.sum(dim=1)
