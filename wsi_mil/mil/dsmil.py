"""DSMIL (Li et al., CVPR 2021): max-instance stream + critical-instance attention stream."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from wsi_mil.mil.base import MILModel, MILOutput
from wsi_mil.mil.layers import make_embed, xavier_init


class DSMIL(MILModel):
    """Dual-stream MIL on embedded instances h [N, hidden].

    1. Instance classifier: instance logits [N, C]; the critical instance of class c is argmax_i.
    2. Queries q = tanh(W2 relu(W1 h)); A = softmax over N of <q_i, q_crit_c> / sqrt(d_q) -> [N, C].
    3. B = A^T V [C, hidden] (V = Dropout + Linear on h); bag logits = Conv1d(C, C, kernel=hidden)(B).

    ``embedding`` is B [C, hidden]; ``instance_scores`` is the class-1 attention column for binary
    tasks (the mean over classes otherwise), so it sums to 1; ``instance_logits`` are returned.
    ``bag_loss`` = 0.5 CE(bag) + 0.5 CE(max over instances of the instance logits).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 512,
        query_dim: int = 128,
        dropout: float = 0.25,
        value_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = make_embed(in_dim, hidden_dim, dropout)
        self.instance_classifier = nn.Linear(hidden_dim, n_classes)
        self.query = nn.Sequential(
            nn.Linear(hidden_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
        )
        self.value = nn.Sequential(nn.Dropout(value_dropout), nn.Linear(hidden_dim, hidden_dim))
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=hidden_dim)
        self.query_dim = query_dim
        xavier_init(self)

    def aggregate(self, h: Tensor) -> MILOutput:
        """Dual-stream aggregation (Li et al., CVPR 2021; the steps of the class docstring).

        h [N, hidden] -> MILOutput:
            ``logits`` [C], ``embedding`` B [C, hidden], ``instance_scores`` [N] (attention of class 1,
            or the mean over classes; sums to 1), ``instance_logits`` [N, C].
        """
        instance_logits = self.instance_classifier(h)  # [N, C]
        critical = instance_logits.argmax(dim=0)  # [C]
        q = self.query(h)  # [N, dq]
        q_crit = self.query(h[critical])  # [C, dq]
        attention = torch.softmax(q @ q_crit.T / math.sqrt(self.query_dim), dim=0)  # [N, C]
        bag = attention.T @ self.value(h)  # [C, hidden]
        logits = self.bag_classifier(bag.unsqueeze(0)).view(-1)
        scores = attention[:, 1] if attention.shape[1] == 2 else attention.mean(dim=1)
        return MILOutput(logits=logits, embedding=bag, instance_scores=scores, instance_logits=instance_logits)

    def bag_loss(self, out: MILOutput, target: Tensor) -> Tensor:
        """0.5 bag cross-entropy + 0.5 cross-entropy of the max-instance logits."""
        target = target.view(1)
        bag_ce = nn.functional.cross_entropy(out.logits.unsqueeze(0), target)
        assert out.instance_logits is not None
        max_logits = out.instance_logits.max(dim=0).values
        inst_ce = nn.functional.cross_entropy(max_logits.unsqueeze(0), target)
        return 0.5 * bag_ce + 0.5 * inst_ce
