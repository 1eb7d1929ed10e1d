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
MIN_NEGATIVE_BAGS = 5  # fewer negative training slides cannot say how far negative slides lie from each other
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
                    rng: np.random.Generator, device: torch.device, k: int = NEIGHBOURS) -> Tensor | None:
    """Boolean [M] over the instances of ``bags`` (bag by bag, in row order): True for positive-bag instances
    novel against the negative bags (see the module docstring); negative-bag instances are always False.

    Bags are read one at a time (only the reference and calibration samples are held together). Cost:
    (positive-bag instances + ``MAX_CALIBRATION``) x ``MAX_REFERENCE`` x D multiply-adds. With fewer than
    ``MIN_NEGATIVE_BAGS`` negative bags there is nothing to calibrate against: None.
    """
    negative_bags = [i for i, b in enumerate(bags) if int(b.label) == 0]
    if len(negative_bags) < MIN_NEGATIVE_BAGS:
        return None
    sizes = [int(b.features.shape[0]) for b in bags]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    out = torch.zeros(int(starts[-1]), dtype=torch.bool, device=device)

    def view(i: int, rows: np.ndarray | None = None) -> Tensor:
        x = bags[i].features if rows is None else bags[i].features[torch.as_tensor(rows)]
        x = x.to(device, torch.float32)
        return normalizer(x) if normalizer is not None else x

    def sample(limit: int) -> tuple[Tensor, Tensor]:
        total = sum(sizes[i] for i in negative_bags)
        keep = min(1.0, limit / max(1, total))
        parts, owners = [], []
        for i in negative_bags:
            n = sizes[i]
            take = rng.permutation(n)[:max(1, int(round(n * keep)))] if n else np.zeros(0, np.int64)
            parts.append(view(i, np.sort(take)))
            owners.append(torch.full((take.shape[0],), i, device=device))
        return torch.cat(parts), torch.cat(owners)

    reference, reference_bag = sample(MAX_REFERENCE)
    calibration, calibration_bag = sample(MAX_CALIBRATION)
    neg_score = kth_neighbour_distance(calibration, reference, k, calibration_bag, reference_bag)
    threshold = torch.quantile(neg_score[torch.isfinite(neg_score)], float(quantile))
    for i, b in enumerate(bags):
        if int(b.label) != 0 and sizes[i]:
            out[int(starts[i]):int(starts[i + 1])] = kth_neighbour_distance(view(i), reference, k) > threshold
    return out
