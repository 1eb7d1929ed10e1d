"""INS losses and target updates: candidate labels, PPLG soft targets, SupCon, InfoNCE, soft CE."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def candidate_labels(bag_labels: Tensor) -> Tensor:
    """Partial labels from slide labels only: [1, 0] for negative bags, [1, 1] for positive bags."""
    bag_labels = bag_labels.long().view(-1)
    y = torch.ones(bag_labels.shape[0], 2, device=bag_labels.device)
    y[bag_labels == 0, 1] = 0.0
    return y


def initial_confidence(candidates: Tensor, positive: float = 0.5) -> Tensor:
    """Soft targets at the start: [1, 0] for negative-bag instances, [1 - positive, positive] for the
    others (``positive=0.5``: the candidate set normalised, as in the reference)."""
    conf = candidates / candidates.sum(dim=1, keepdim=True)
    both = candidates[:, 1] > 0
    conf[both] = torch.tensor([1.0 - positive, positive], device=conf.device, dtype=conf.dtype)
    return conf


def bag_targets(candidates: Tensor, positive: float = 1.0) -> Tensor:
    """Pretrain targets from the bag label: [1, 0] for negative bags, [1 - positive, positive] otherwise."""
    return initial_confidence(candidates, positive)


def restricted_probs(logits: Tensor, candidates: Tensor) -> Tensor:
    """Classifier probabilities restricted to the candidate set and renormalised [B, 2]."""
    p = torch.softmax(logits, dim=1) * candidates
    return p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)


def auto_positive_target(positive_bag_share: float) -> float:
    """Soft target for positive-bag instances that keeps the 0.5 boundary between the two populations.

    Trained on target t, a negative-looking instance converges to about ``t * q`` (q: share of the
    negative-looking instances that sit in positive bags, about the share of instances in positive bags)
    and a positive-looking one to ``t``; ``t = (0.5 + min(1, 0.5 / q)) / 2`` puts 0.5 between them.
    """
    q = min(max(float(positive_bag_share), 1e-6), 1.0)
    return float(min(0.99, (0.5 + min(1.0, 0.5 / q)) / 2.0))


def phi_at(epoch: int, num_epochs: int, start: float, end: float) -> float:
    """PPLG mixing weight: linear from ``start`` at epoch 0 to ``end`` at the last epoch."""
    if num_epochs <= 1:
        return float(start)
    t = min(max(epoch, 0), num_epochs - 1) / (num_epochs - 1)
    return float(start + (end - start) * t)


@torch.no_grad()
def pplg_update(conf: Tensor, prototype_scores: Tensor, candidates: Tensor, phi: float,
                allowed: Tensor | None = None) -> Tensor:
    """Prototype-based pseudo label generation for a batch of soft targets.

    ``conf <- phi * conf + (1 - phi) * onehot(argmax(s * Y))``; rows whose candidate set is {negative}
    (instances of negative bags) are forced back to [1, 0]. ``allowed`` (bool [B], optional): rows where
    it is False take the negative class as their one-hot choice (the negative-bag guard). Returns the new
    targets [B, 2].
    """
    choice = (prototype_scores * candidates).argmax(dim=1)
    if allowed is not None:
        choice = choice * allowed.to(choice.dtype)
    onehot = F.one_hot(choice, num_classes=conf.shape[1]).to(conf.dtype)
    new = phi * conf + (1.0 - phi) * onehot
    negative = candidates[:, 1] == 0
    new[negative] = torch.tensor([1.0, 0.0], device=conf.device, dtype=conf.dtype)
    return new


def guarded_pseudo_labels(probs: Tensor, candidates: Tensor, threshold: float | None) -> Tensor:
    """Hard pseudo labels [B] (long) from candidate-restricted probabilities [B, 2].

    ``threshold`` None: ``argmax`` (the reference). Otherwise an instance is positive only when it may
    be (candidate set {0, 1}) and its p(positive) exceeds ``threshold`` (a high quantile of what
    negative-bag instances score).
    """
    if threshold is None:
        return probs.argmax(dim=1)
    return ((candidates[:, 1] > 0) & (probs[:, 1] > threshold)).long()


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against soft targets: ``-(targets * log_softmax(logits)).sum(1).mean()``."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def supcon_loss(
    anchors: Tensor, pool: Tensor, anchor_labels: Tensor, pool_labels: Tensor, temperature: float
) -> Tensor:
    """Supervised contrastive loss of anchors [B, d] against a pool [M, d] whose first B rows are the anchors.

    For anchor i the candidates are every pool entry except itself (column i); positives are those of
    the same (pseudo) class. ``loss_i = -mean_{p in P(i)} log(exp(a_i.p/T) / sum_{j != i} exp(a_i.z_j/T))``,
    averaged over anchors that have at least one positive.
    """
    b = anchors.shape[0]
    logits = anchors @ pool.t() / temperature
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    idx = torch.arange(b, device=anchors.device)
    self_mask[idx, idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (anchor_labels.view(-1, 1) == pool_labels.view(1, -1)) & ~self_mask
    log_prob = log_prob.masked_fill(~positives, 0.0)
    n_pos = positives.sum(dim=1)
    has = n_pos > 0
    if not bool(has.any()):
        return anchors.sum() * 0.0
    per_anchor = -log_prob.sum(dim=1)[has] / n_pos[has]
    return per_anchor.mean()


def infonce_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo InfoNCE: each q_i must pick its own key k_i among k_i and the queued keys."""
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.t() if queue.shape[0] else q.new_zeros(q.shape[0], 0)
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


def moco_warmup_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """Warm-up contrastive loss of the reference (SupCon with ``mask=None``): each q_i must pick its own
    key k_i out of every other query, every key and the queued keys (instance identity as the class)."""
    b = q.shape[0]
    ids = torch.arange(b, device=q.device)
    pool = torch.cat([q, k, queue], dim=0)
    pool_ids = torch.cat([ids, ids, torch.full((queue.shape[0],), -1, device=q.device, dtype=ids.dtype)])
    return supcon_loss(q, pool, ids, pool_ids, temperature)
