"""Mean and max pooling baselines."""

from __future__ import annotations

from torch import Tensor, nn

from wsi_mil.mil.base import MILModel, MILOutput
from wsi_mil.mil.layers import make_embed, positive_evidence, xavier_init


class _InstanceHeadMIL(MILModel):
    """Embedding followed by one Linear head shared by the bag and its instances."""

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 512, dropout: float = 0.25) -> None:
        super().__init__()
        self.embed = make_embed(in_dim, hidden_dim, dropout)
        self.head = nn.Linear(hidden_dim, n_classes)
        xavier_init(self)



class MeanPoolMIL(_InstanceHeadMIL):
    """Bag embedding = mean of the embedded instances; logits = Linear head on it.

    Because the head is linear, the bag logits equal the mean of the per-instance logits, so the
    instance scores (the head applied to each instance, as class-1 log-odds) decompose the bag score.
    """

    def aggregate(self, h: Tensor) -> MILOutput:
        """Mean pooling: bag ``z = mean_i h_i``, logits ``W z`` (= the mean of the instance logits ``W h_i``).

        h [N, hidden] -> MILOutput:
            ``logits`` [C], ``embedding`` z [hidden], ``instance_scores`` [N] class-1 log-odds of each
            instance (detached), ``instance_logits`` [N, C].
        """
        bag = h.mean(dim=0)
        instance_logits = self.head(h)
        return MILOutput(
            logits=self.head(bag),
            embedding=bag,
            instance_scores=positive_evidence(instance_logits).detach(),
            instance_logits=instance_logits,
        )


class MaxPoolMIL(_InstanceHeadMIL):
    """Instance-level max pooling: the bag takes the logits of its most positive instance.

    Every instance is scored by the head (class-1 log-odds); the bag logits and embedding are those of
    the top-scoring instance (CLAM's "MIL" baseline, mi-Net style). Instance scores are the log-odds.
    """

    def aggregate(self, h: Tensor) -> MILOutput:
        """Max pooling over instances: the bag takes the logits of its most positive instance.

        h [N, hidden] -> MILOutput:
            ``logits`` [C] and ``embedding`` [hidden] of the top instance, ``instance_scores`` [N] class-1
            log-odds (detached), ``instance_logits`` [N, C].
        """
        instance_logits = self.head(h)
        scores = positive_evidence(instance_logits)
        top = int(scores.argmax())
        return MILOutput(
            logits=instance_logits[top],
            embedding=h[top],
            instance_scores=scores.detach(),
            instance_logits=instance_logits,
        )
