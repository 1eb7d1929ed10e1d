"""INS memory: the FIFO key queue (with class distributions) and the class prototypes."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class KeyQueue(nn.Module):
    """A FIFO of the last ``size`` key embeddings [K, dim] and their class distributions [K, C].

    Entries are written at a moving pointer that wraps around, so the oldest entry is always the one
    overwritten; :meth:`contents` returns only the filled part.
    """

    keys: Tensor
    probs: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, size: int, dim: int, n_classes: int = 2) -> None:
        super().__init__()
        self.size = int(size)
        self.register_buffer("keys", torch.zeros(self.size, dim))
        self.register_buffer("probs", torch.zeros(self.size, n_classes))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor, probs: Tensor) -> None:
        """Append a batch (keys [B, dim], probs [B, C]); a batch longer than the queue keeps its tail."""
        keys = keys.detach()[-self.size:]
        probs = probs.detach()[-self.size:]
        n = keys.shape[0]
        if n == 0:
            return
        slots = (int(self.ptr) + torch.arange(n, device=self.keys.device)) % self.size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.probs[slots] = probs.to(self.probs.dtype)
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.count.fill_(min(int(self.count) + n, self.size))

    def contents(self) -> tuple[Tensor, Tensor]:
        """The filled entries (keys [k, dim], probs [k, C]) in storage order."""
        n = int(self.count)
        return self.keys[:n], self.probs[:n]

    def labels(self) -> Tensor:
        """Pseudo labels (argmax of the stored class distributions) of the filled entries."""
        return self.contents()[1].argmax(dim=1)


class Prototypes(nn.Module):
    """L2-normalised class prototypes [C, dim], moved towards the embeddings pseudo-labelled as each class."""

    vectors: Tensor

    def __init__(self, n_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("vectors", torch.zeros(n_classes, dim))

    def similarity(self, q: Tensor) -> Tensor:
        """Soft assignment softmax(q @ P.T) [B, C] of embeddings to the (current) prototypes."""
        return torch.softmax(q @ self.vectors.t(), dim=1)

    @torch.no_grad()
    def update(self, q: Tensor, labels: Tensor, momentum: float) -> None:
        """Sequential EMA ``P[c] <- m * P[c] + (1 - m) * q_i`` over the batch in order, then normalise.

        The loop over instances is done in closed form: after the n instances of class c,
        ``P[c] = m^n P[c] + (1 - m) * sum_j m^(n-1-j) q_j``.
        """
        q = q.detach().to(self.vectors.dtype)
        m = float(momentum)
        for c in range(self.vectors.shape[0]):
            rows = q[labels == c]
            n = rows.shape[0]
            if n == 0:
                continue
            powers = torch.arange(n - 1, -1, -1, device=q.device, dtype=q.dtype)
            weights = (1.0 - m) * torch.pow(torch.full_like(powers, m), powers)
            self.vectors[c] = (m**n) * self.vectors[c] + (weights[:, None] * rows).sum(dim=0)
        self.vectors.copy_(F.normalize(self.vectors, dim=1))
