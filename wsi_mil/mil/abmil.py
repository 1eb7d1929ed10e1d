"""Attention-based MIL (Ilse et al., ICML 2018), plain and gated."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsi_mil.mil.base import MILModel, MILOutput
from wsi_mil.mil.layers import make_embed, xavier_init


class ABMIL(MILModel):
    """a = softmax_N(w^T act(V h)); bag = sum_i a_i h_i; logits = Linear(bag).

    Plain: act = ReLU (as the MHIM-MIL reference code runs it, see docs/MHIM-MIL.md).
    Gated: tanh(V h) * sigmoid(U h). ``instance_scores`` is the attention a (sums to 1).

    Ilse, Tomczak and Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018, Eqs. 8-9.
    Attention layers V, U and w have no bias terms, as in the MHIM-MIL v1 reference code's ABMIL (the
    paper's equations have none either; Ilse's code has them). A bias on w cannot change a softmax over
    instances; one on V would shift the ReLU/tanh hinge. Deviations from the MHIM-MIL reference: none in
    the plain variant beyond Xavier-normal init; the gated variant follows Ilse et al. Eq. 9.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 512,
        attention_dim: int = 128,
        dropout: float = 0.25,
        gated: bool = False,
    ) -> None:
        super().__init__()
        self.gated = gated
        self.embed = make_embed(in_dim, hidden_dim, dropout)
        self.attention_v = nn.Linear(hidden_dim, attention_dim, bias=False)
        self.attention_u = nn.Linear(hidden_dim, attention_dim, bias=False) if gated else None
        self.attention_w = nn.Linear(attention_dim, 1, bias=False)
        self.head = nn.Linear(hidden_dim, n_classes)
        xavier_init(self)

    def attention_logits(self, h: Tensor) -> Tensor:
        """Unnormalised attention [N]."""
        if self.attention_u is not None:
            hidden = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        else:
            hidden = torch.relu(self.attention_v(h))
        return self.attention_w(hidden).squeeze(1)

    def aggregate(self, h: Tensor) -> MILOutput:
        """Attention pooling: ``a = softmax_N(w^T act(V h_i))``, bag ``z = sum_i a_i h_i``, logits ``W z``.

        Ilse et al., ICML 2018, Eq. 8 (act = tanh there, ReLU here as in the MHIM-MIL reference code)
        and Eq. 9 (gated: ``tanh(V h_i) * sigmoid(U h_i)``).

        h [N, hidden] -> MILOutput:
            ``logits`` [C], ``embedding`` z [hidden], ``instance_scores`` a [N] (sums to 1).
        """
        attention = torch.softmax(self.attention_logits(h), dim=0)
        bag = attention @ h
        return MILOutput(logits=self.head(bag), embedding=bag, instance_scores=attention)
