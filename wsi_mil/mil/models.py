"""The registry of MIL aggregators: a name -> a :class:`~wsi_mil.mil.base.MILModel`."""

from __future__ import annotations

from collections.abc import Callable

from wsi_mil.config import ModelConfig
from wsi_mil.errors import ConfigError
from wsi_mil.mil.abmil import ABMIL
from wsi_mil.mil.base import MILModel
from wsi_mil.mil.dsmil import DSMIL
from wsi_mil.mil.pooling import MaxPoolMIL, MeanPoolMIL
from wsi_mil.mil.transmil import TransMIL

_Builder = Callable[[int, int, ModelConfig], MILModel]

MODELS: dict[str, _Builder] = {
    "mean": lambda d, c, cfg: MeanPoolMIL(d, c, cfg.hidden_dim, cfg.dropout),
    "max": lambda d, c, cfg: MaxPoolMIL(d, c, cfg.hidden_dim, cfg.dropout),
    "abmil": lambda d, c, cfg: ABMIL(d, c, cfg.hidden_dim, cfg.attention_dim, cfg.dropout, gated=False),
    "gated_abmil": lambda d, c, cfg: ABMIL(d, c, cfg.hidden_dim, cfg.attention_dim, cfg.dropout, gated=True),
    "transmil": lambda d, c, cfg: TransMIL(d, c, cfg.hidden_dim, cfg.heads, cfg.dropout),
    "dsmil": lambda d, c, cfg: DSMIL(d, c, cfg.hidden_dim, dropout=cfg.dropout),
}

MODEL_NAMES: tuple[str, ...] = tuple(MODELS)


def build_model(name: str, in_dim: int, n_classes: int, cfg: ModelConfig | None = None) -> MILModel:
    """Build aggregator ``name`` (one of :data:`MODEL_NAMES`) for ``in_dim`` features and ``n_classes``."""
    if name not in MODELS:
        raise ConfigError(f"unknown MIL model '{name}'; choose one of: {', '.join(MODEL_NAMES)}.")
    if in_dim < 1 or n_classes < 2:
        raise ConfigError(f"model '{name}' needs in_dim >= 1 and n_classes >= 2 (got {in_dim}, {n_classes}).")
    return MODELS[name](in_dim, n_classes, cfg if cfg is not None else ModelConfig())
