"""Pairwise squared distances between updates, Krum scores, and the one rule that picks by them.

Distances. ‖a − b‖² = ‖a‖² + ‖b‖² − 2⟨a, b⟩ turns K² vector differences into one matrix product, but
it subtracts squared norms: clients of one task share a large common component, whose square swamps
their differences (in float32 a common norm of 10⁴ leaves nothing of deviations of norm 0.1). So each
coordinate is first centred on the updates' mean, which moves no distance, and the product is formed in
float64: what remains to cancel is the updates' spread about their mean, not their size.

Ties. Rounding differs between CPUs and BLAS kernels, and exact ties (identical or symmetric updates)
are common, so a choice must not rest on the last bits of a score. The rule: a score counts as equal
to the lowest when it exceeds it by no more than `TIE_TOLERANCE` times the squared norms (about the
mean) the two scores' distances were formed from, a bound far above float64 rounding there; of the
scores equal to the lowest, the one of the client name that sorts first wins. Rounding can then sway
a choice only where a score lies almost exactly that bound above the lowest. Updates are put in
client-name order before anything is computed, so the order they arrive in changes no result, not even
in its last bit.
"""

from __future__ import annotations

import torch

from fedtune.aggregation.base import ClientUpdate
from fedtune.tensors import single_threaded

#: Scores closer than this times the squared norms behind them count as equal (see the module's doc).
TIE_TOLERANCE = 1e-9

#: Coordinates per pass: K rows of this many float64 values stay in cache from the copy through the
#: centring to the product, and bound the working memory beside one key's K tensors.
COLUMNS = 4096


@single_threaded()
def squared_distances(updates: list[ClientUpdate]) -> tuple[torch.Tensor, torch.Tensor]:
    """K×K float64 ‖Δi − Δj‖² over all tensors of the updates, and each ‖Δi − mean‖².

    Each tensor of each update is indexed once (a lazy update loads it then).
    """
    k = len(updates)
    gram = torch.zeros(k, k, dtype=torch.float64)
    buf = torch.empty(k, COLUMNS, dtype=torch.float64)
    for key in updates[0].delta:
        rows = [u.delta[key].reshape(-1) for u in updates]
        n = rows[0].numel()
        for start in range(0, n, COLUMNS):
            x = buf[:, : min(COLUMNS, n - start)]
            for dst, row in zip(x, rows, strict=True):
                dst.copy_(row[start : start + COLUMNS])
            x.sub_(x.mean(0))
            gram.addmm_(x, x.T)
    sq = gram.diagonal().clone()
    d2 = sq[:, None] + sq[None, :] - 2 * gram
    d2.clamp_(min=0).fill_diagonal_(0)
    return d2, sq


def krum_scores(d2: torch.Tensor, sq: torch.Tensor, byzantine: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each update's summed squared distance to its K − f − 2 nearest others (Blanchard et al. 2017), and
    the margin within which another score counts as equal to it.

    Where K − f − 2 < 1 (a remnant set in Bulyan's selection) the nearest one neighbour counts.
    """
    k = d2.shape[0]
    nearest = min(max(k - byzantine - 2, 1), k - 1)
    if nearest < 1:
        return torch.zeros(k, dtype=d2.dtype), torch.zeros(k, dtype=d2.dtype)
    off = d2 + torch.diag(torch.full((k,), float("inf"), dtype=d2.dtype))
    near = torch.sort(off, dim=1, stable=True).indices[:, :nearest]
    scores = off.gather(1, near).sum(dim=1)
    margin = TIE_TOLERANCE * (nearest * sq + sq[near].sum(dim=1))
    return scores, margin


def best(scores: torch.Tensor, margin: torch.Tensor) -> int:
    """Position of the winner by the tie rule: the first of the scores equal to the lowest (positions
    follow client names, see `krum_choice`)."""
    low = int(torch.argmin(scores))
    equal = scores - scores[low] <= margin + margin[low]
    return int(torch.nonzero(equal)[0])


def krum_choice(updates: list[ClientUpdate], byzantine: int, count: int, rescore: bool) -> list[ClientUpdate]:
    """`count` updates picked one at a time by lowest Krum score, in the order picked.

    With `rescore` each pick scores only the updates not yet picked (Bulyan's selection); without, one
    scoring of all ranks them (Multi-Krum).
    """
    ups = sorted(updates, key=lambda u: u.client)
    d2, sq = squared_distances(ups)
    ranked = krum_scores(d2, sq, byzantine)
    left = list(range(len(ups)))
    chosen: list[ClientUpdate] = []
    for _ in range(count):
        if rescore:
            scores, margin = krum_scores(d2[left][:, left], sq[left], byzantine)
        else:
            scores, margin = ranked[0][left], ranked[1][left]
        pick = left.pop(best(scores, margin))
        chosen.append(ups[pick])
    return chosen
