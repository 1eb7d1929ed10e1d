"""The aggregators' builders, bound to their entries of :mod:`wsi_mil.registry`, and the factory.

``build_model(name, in_dim, n_classes, model_cfg)`` builds any registered aggregator (mean/max
pooling, ABMIL, gated ABMIL, TransMIL, DSMIL, or one registered by the user).
"""

from __future__ import annotations

from wsi_mil.config import ModelConfig
from wsi_mil.errors import ConfigError
from wsi_mil.mil.abmil import ABMIL
from wsi_mil.mil.base import MILModel
from wsi_mil.mil.dsmil import DSMIL
from wsi_mil.mil.pooling import MaxPoolMIL, MeanPoolMIL
from wsi_mil.mil.transmil import TransMIL
from wsi_mil.registry import builder, model_names, model_spec


@builder("mean")
def _mean(d: int, c: int, cfg: ModelConfig) -> MILModel:
    return MeanPoolMIL(d, c, cfg.hidden_dim, cfg.dropout)


@builder("max")
def _max(d: int, c: int, cfg: ModelConfig) -> MILModel:
    return MaxPoolMIL(d, c, cfg.hidden_dim, cfg.dropout)


@builder("abmil")
def _abmil(d: int, c: int, cfg: ModelConfig) -> MILModel:
    return ABMIL(d, c, cfg.hidden_dim, cfg.attention_dim, cfg.dropout, gated=False)


@builder("gated_abmil")
def _gated_abmil(d: int, c: int, cfg: ModelConfig) -> MILModel:
    return ABMIL(d, c, cfg.hidden_dim, cfg.attention_dim, cfg.dropout, gated=True)


@builder("transmil")
def _transmil(d: int, c: int, cfg: ModelConfig) -> MILModel:
    return TransMIL(d, c, cfg.hidden_dim, cfg.heads, cfg.dropout)


@builder("dsmil")
def _dsmil(d: int, c: int, cfg: ModelConfig) -> MILModel:
    return DSMIL(d, c, cfg.hidden_dim, dropout=cfg.dropout)


def build_model(name: str, in_dim: int, n_classes: int, cfg: ModelConfig | None = None) -> MILModel:
    """Build the registered aggregator ``name`` for ``in_dim`` features and ``n_classes`` classes.

    Parameters
    ----------
    name : str
        A registered aggregator (:func:`wsi_mil.registry.model_names` with ``kind="aggregator"``).
    in_dim : int
        Instance feature width D.
    n_classes : int
        Number of classes C (at least 2).
    cfg : ModelConfig, optional
        Architecture settings (defaults when None).

    Returns
    -------
    MILModel
        An untrained model in training mode, on the CPU.

    Raises
    ------
    ConfigError
        For an unknown name, a training method's name, or impossible sizes.
    """
    spec = model_spec(name)
    if spec.kind != "aggregator" or spec.build is None:
        raise ConfigError(f"'{name}' is not an aggregator; choose one of: {', '.join(model_names('aggregator'))}.")
    if in_dim < 1 or n_classes < 2:
        raise ConfigError(f"model '{name}' needs in_dim >= 1 and n_classes >= 2 (got {in_dim}, {n_classes}).")
    return spec.build(in_dim, n_classes, cfg if cfg is not None else ModelConfig())
