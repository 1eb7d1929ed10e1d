"""The model registry: every name ``model.name`` accepts, what it is, and how it is built.

One entry per model, read by the config validation (``model.name``, ``model.mhim.student``,
``run.models`` and the cross-field checks), by the factories (:func:`wsi_mil.mil.models.build_model`,
:func:`wsi_mil.mil.methods.build_method`), by ``wsi-mil config show --describe`` and by the tests.

This module imports neither torch nor the model code, so reading a config stays cheap: the built-in
models are declared here, and the modules implementing them bind their builders to these entries with
:func:`builder` when they are imported (``wsi_mil.mil.models`` for aggregators, ``wsi_mil.mil.methods``
for training methods). A model of your own is one call::

    register_model("my_pool", kind="aggregator", summary="...", student=True,
                   build=lambda in_dim, n_classes, model_cfg: MyPool(in_dim, n_classes, model_cfg.hidden_dim))

Builders: an ``aggregator`` is built as ``build(in_dim, n_classes, model_cfg) -> MILModel`` and trained by
the plain bag-level method; a ``method`` (MHIM-MIL, INS) brings its own training and is built as
``build(cfg, fold_context) -> MILMethod``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from wsi_mil.errors import ConfigError

Kind = Literal["aggregator", "method"]


@dataclass
class ModelSpec:
    """One registered model.

    Attributes
    ----------
    name : str
        What ``model.name`` (and ``run.models``) accept.
    kind : {'aggregator', 'method'}
        ``aggregator``: a :class:`~wsi_mil.mil.base.MILModel` trained bag by bag; ``method``: its own
        training procedure (a :class:`~wsi_mil.mil.base.MILMethod`).
    summary : str
        One line for listings (``wsi-mil config show --describe``).
    student : bool
        An aggregator with per-instance attention that MHIM-MIL can mask (``model.mhim.student``).
    uses_heads : bool
        Multi-head attention over ``model.hidden_dim``: needs ``hidden_dim % heads == 0``.
    binary_only : bool
        Trains binary tasks only (class index 1 = positive).
    build : callable or None
        The builder (see the module docstring); None until the implementing module is imported.
    """

    name: str
    kind: Kind
    summary: str
    student: bool = False
    uses_heads: bool = False
    binary_only: bool = False
    build: Callable[..., Any] | None = None


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, *, kind: Kind, summary: str, student: bool = False, uses_heads: bool = False,
                   binary_only: bool = False, build: Callable[..., Any] | None = None) -> ModelSpec:
    """Add a model to the registry.

    Raises
    ------
    ConfigError
        When ``name`` is taken or ``kind`` is unknown.
    """
    if name in MODELS:
        raise ConfigError(f"a model named {name!r} is registered already; choose another name.")
    if kind not in ("aggregator", "method"):
        raise ConfigError(f"model kind must be 'aggregator' or 'method', got {kind!r}.")
    spec = ModelSpec(name, kind, summary, student=student, uses_heads=uses_heads, binary_only=binary_only,
                     build=build)
    MODELS[name] = spec
    return spec


def builder(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator binding the builder of the declared model ``name`` (used by the implementing module)."""

    def bind(build: Callable[..., Any]) -> Callable[..., Any]:
        model_spec(name).build = build
        return build

    return bind


def model_names(kind: Kind | None = None, *, student: bool | None = None) -> tuple[str, ...]:
    """Registered names in registration order, optionally of one kind / only MHIM-capable students."""
    return tuple(s.name for s in MODELS.values()
                 if (kind is None or s.kind == kind) and (student is None or s.student == student))


def model_spec(name: str) -> ModelSpec:
    """The entry of ``name``.

    Raises
    ------
    ConfigError
        Naming the registered models when ``name`` is not one of them.
    """
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown MIL model {name!r}; choose one of: {', '.join(model_names())}.") from None


# The built-in models (builders: wsi_mil.mil.models for aggregators, wsi_mil.mil.methods for methods).
register_model("mean", kind="aggregator", summary="mean pooling of the embedded instances")
register_model("max", kind="aggregator", summary="max pooling of the embedded instances")
register_model("abmil", kind="aggregator", student=True,
               summary="attention-based MIL (Ilse et al., ICML 2018)")
register_model("gated_abmil", kind="aggregator", student=True,
               summary="gated attention-based MIL (Ilse et al., ICML 2018)")
register_model("transmil", kind="aggregator", student=True, uses_heads=True,
               summary="TransMIL: Nystrom self-attention with a PPEG position encoder (Shao et al., NeurIPS 2021)")
register_model("dsmil", kind="aggregator", student=True,
               summary="DSMIL: dual-stream instance and bag classifier (Li et al., CVPR 2021)")
register_model("mhim", kind="method",
               summary="MHIM-MIL: masked hard instance mining with a momentum teacher (Tang et al., ICCV 2023)")
register_model("ins", kind="method", binary_only=True,
               summary="INS: instance classifier trained with prototype pseudo-labels and contrastive learning (Qu et al., TCSVT)")
