"""Novelty of positive-bag instances against negative bags: the pseudo labels that negative bags guarantee.

Every instance of a negative bag is negative (the standard MIL assumption), so a positive-bag instance
that lies farther from the negative-bag instances than negative-bag instances lie from each other is a
positive candidate. Score: the Euclidean distance to the k-th nearest negative-bag instance (a random
reference sample of at most ``max_reference`` of them). Threshold: a quantile of the same score of
negative-bag instances, each measured against the reference instances of *other* bags (so a bag is never
its own neighbour).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from wsi_mil.mil.base import BagItem

NEIGHBOURS = 5  # k of the k-th nearest negative-bag instance
MAX_REFERENCE = 20000  # negative-bag instances in the reference sample
MAX_CALIBRATION = 20000  # negative-bag instances whose own novelty sets the threshold
CHUNK = 2048  # query rows per distance block


def kth_neighbour_distance(queries: Tensor, reference: Tensor, k: int, query_bag: Tensor | None = None,
                           reference_bag: Tensor | None = None) -> Tensor:
    """Distance [Q] from each query [Q, D] to its k-th nearest reference row [R, D] (float32).

    With ``query_bag`` [Q] and ``reference_bag`` [R] (bag ids), references of the query's own bag are
    skipped. Computed in blocks of ``CHUNK`` queries; k is capped at the number of usable references.
    """
    out = []
    for start in range(0, queries.shape[0], CHUNK):
        d = torch.cdist(queries[start:start + CHUNK].float(), reference.float())
        if query_bag is not None and reference_bag is not None:
            same = query_bag[start:start + CHUNK, None] == reference_bag[None, :]
            d = d.masked_fill(same, float("inf"))
        kk = max(1, min(int(k), d.shape[1]))
        out.append(d.topk(kk, dim=1, largest=False).values[:, -1])
    return torch.cat(out) if out else queries.new_zeros(0)


def novel_instances(bags: Sequence[BagItem], normalizer: Callable[[Tensor], Tensor] | None, quantile: float,
                    rng: np.random.Generator, device: torch.device, k: int = NEIGHBOURS) -> Tensor:
    """Boolean [M] over the instances of ``bags`` (bag by bag, in row order): True for positive-bag instances
    novel against the negative bags (see the module docstring); negative-bag instances are always False.

    Without negative bags (nothing to compare with) every positive-bag instance is marked novel, which
    amounts to the slide label.
    """
    feats = [b.features.to(device, torch.float32) for b in bags]
    if normalizer is not None:
        feats = [normalizer(x) for x in feats]
    labels = [int(b.label) for b in bags]
    bag_id = torch.cat([torch.full((x.shape[0],), i, device=device) for i, x in enumerate(feats)])
    x = torch.cat(feats)
    negative = torch.as_tensor(np.repeat(np.asarray(labels) == 0, [f.shape[0] for f in feats]), device=device)
    out = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
    neg_ids = torch.nonzero(negative).view(-1)
    if neg_ids.numel() == 0:
        out[~negative] = True
        return out
    pick = neg_ids[torch.as_tensor(rng.permutation(neg_ids.numel())[:MAX_REFERENCE], device=device)]
    calib = neg_ids[torch.as_tensor(rng.permutation(neg_ids.numel())[:MAX_CALIBRATION], device=device)]
    reference, reference_bag = x[pick], bag_id[pick]
    neg_score = kth_neighbour_distance(x[calib], reference, k, bag_id[calib], reference_bag)
    neg_score = neg_score[torch.isfinite(neg_score)]
    pos_ids = torch.nonzero(~negative).view(-1)
    if neg_score.numel() == 0:  # a single negative bag: no other bag to calibrate against
        out[pos_ids] = True
        return out
    threshold = torch.quantile(neg_score, float(quantile))
    pos_score = kth_neighbour_distance(x[pos_ids], reference, k)
    out[pos_ids] = pos_score > threshold
    return out
