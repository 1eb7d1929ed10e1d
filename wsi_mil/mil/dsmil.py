"""DSMIL (Li, Li and Eliceiri, CVPR 2021): max-instance stream + critical-instance attention stream."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from wsi_mil.mil.base import MILModel, MILOutput
from wsi_mil.mil.layers import make_embed, xavier_init


class DSMIL(MILModel):
    """Dual-stream MIL on embedded instances h [N, hidden].

    Li, Li and Eliceiri, "Dual-stream Multiple Instance Learning Network for Whole Slide Image
    Classification with Self-supervised Contrastive Learning", CVPR 2021:

    1. Instance classifier (Eq. 1): instance logits [N, C]; the critical instance of class c is
       ``argmax_i`` of its logits (the max-pooling stream).
    2. Queries ``q = tanh(W2 relu(W1 h))`` (Eq. 2); ``A = softmax_N(<q_i, q_crit_c> / sqrt(d_q))`` -> [N, C]
       (Eq. 3, with the 1/sqrt(d) scaling of the reference code).
    3. ``B = A^T V`` [C, hidden] (Eq. 4); bag logits = ``Conv1d(C, C, kernel=hidden)(B)`` (Eq. 5).
    4. Score (Eq. 6 and the reference code's test step): the mean of the bag softmax and the softmax
       of the max-instance logits (:meth:`bag_probs`); loss = 0.5 CE(bag) + 0.5 CE(max-instance logits).

    Value layer V: ``Linear(hidden, hidden) + ReLU`` (after an optional Dropout, ``value_dropout`` = 0),
    as the MHIM-MIL v1 reference code's DSMIL student runs it. The dsmil-wsi reference code
    (binli123/dsmil-wsi, ``passing_v=False`` by default) uses the identity instead; we follow MHIM-MIL
    because DSMIL's published MHIM numbers and our MHIM student come from that code.

    Deviations from the reference code: the instance embedding (``embed``: Linear + ReLU + Dropout) is
    shared by both streams, as in MHIM-MIL v1 (dsmil-wsi feeds raw features to the instance classifier);
    weights are Xavier-normal initialised.

    ``embedding`` is B [C, hidden]; ``instance_scores`` is the class-1 attention column for binary
    tasks (the mean over classes otherwise), so it sums to 1; ``instance_logits`` are returned.
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
        self.value = nn.Sequential(nn.Dropout(value_dropout), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=hidden_dim)
        self.query_dim = query_dim
        xavier_init(self)

    def aggregate(self, h: Tensor) -> MILOutput:
        """Dual-stream aggregation (Li et al., CVPR 2021, Eqs. 1-5; the steps of the class docstring).

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

    def bag_probs(self, out: MILOutput) -> Tensor:
        """``0.5 softmax(bag logits) + 0.5 softmax(max over instances of the instance logits)`` [C].

        The score of the reference codes (dsmil-wsi and MHIM-MIL v1 test steps): the two streams' class
        probabilities averaged; it drives validation AUC, checkpoint and threshold choice and test metrics.
        """
        assert out.instance_logits is not None
        bag = torch.softmax(out.logits.float().reshape(-1), dim=0)
        inst = torch.softmax(out.instance_logits.float().max(dim=0).values, dim=0)
        return 0.5 * bag + 0.5 * inst
