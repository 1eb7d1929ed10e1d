"""INS: prototype-contrastive instance-level MIL (Qu et al., TCSVT); see docs/INS.md.

``INSMethod(cfg, ctx)`` is the :class:`~wsi_mil.mil.base.MILMethod` the trainer drives; the other names
are its parts (networks, key queue, prototypes, losses), exposed for tests and reuse.
"""

from wsi_mil.mil.ins.losses import (
    auto_positive_target,
    candidate_labels,
    guarded_pseudo_labels,
    infonce_loss,
    initial_confidence,
    moco_warmup_loss,
    phi_at,
    pplg_update,
    restricted_probs,
    soft_cross_entropy,
    supcon_loss,
)
from wsi_mil.mil.ins.memory import KeyQueue, Prototypes
from wsi_mil.mil.ins.method import INSMethod, bag_scores
from wsi_mil.mil.ins.networks import INSNet, cnn_backbone, ema_update, feature_backbone
from wsi_mil.mil.ins.novelty import kth_neighbour_distance, novel_instances

__all__ = [
    "INSMethod",
    "auto_positive_target",
    "INSNet",
    "KeyQueue",
    "Prototypes",
    "bag_scores",
    "candidate_labels",
    "cnn_backbone",
    "ema_update",
    "guarded_pseudo_labels",
    "feature_backbone",
    "infonce_loss",
    "initial_confidence",
    "kth_neighbour_distance",
    "moco_warmup_loss",
    "novel_instances",
    "phi_at",
    "pplg_update",
    "restricted_probs",
    "soft_cross_entropy",
    "supcon_loss",
]
