"""Small building blocks shared by the MIL aggregators: input embedding, weight init, instance scores."""

from __future__ import annotations

from torch import Tensor, nn


def make_embed(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """The instance embedding every aggregator starts with: Linear(D -> hidden) + ReLU + Dropout."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))


def xavier_init(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for every Linear layer of ``module``."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def positive_evidence(instance_logits: Tensor) -> Tensor:
    """Per-instance score from instance logits [N, C]; higher = more evidence against class 0.

    Binary: the class-1 log-odds ``logit_1 - logit_0``. Multi-class: the largest non-zero-class logit
    minus the class-0 logit (the same quantity generalised).
    """
    if instance_logits.shape[1] == 1:
        return instance_logits[:, 0]
    return instance_logits[:, 1:].max(dim=1).values - instance_logits[:, 0]
