"""What decides whether a trained model can be reused: each model's own settings.

`wsi-mil train` and `wsi-mil run` reuse a finished MLflow run whose reuse key
(:func:`wsi_mil.workflows.train.workflow_key`) matches; the settings part of that key, and the
settings digest `wsi-mil runs` shows, come from :func:`model_settings`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# model.* keys every model reads; each model's own section (model.mhim.*, model.ins.*) counts only for it
SHARED_MODEL_KEYS = ("model.name", "model.hidden_dim", "model.dropout", "model.attention_dim", "model.heads")


def model_settings(flat: dict[str, Any]) -> dict[str, str]:
    """The settings that shape one model's results, from a flattened config or a run's MLflow params.

    The shared training and split settings (``training.*``), the model keys every model reads
    (:data:`SHARED_MODEL_KEYS`) and the model's own section (``model.<name>.*``: changing
    ``model.ins.lr`` changes INS's settings only). Values as MLflow stores params (strings; other
    values as JSON), so a config and the params logged from it give the same result.
    """
    name = str(flat.get("model.name", ""))
    own = f"model.{name}."
    keep = {k: v for k, v in flat.items() if k.startswith("training.") or k in SHARED_MODEL_KEYS or k.startswith(own)}
    return {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in sorted(keep.items())}


def settings_digest(flat: dict[str, Any]) -> str:
    """Short hash (8 hex digits) of :func:`model_settings`: equal digests, equal model settings."""
    return hashlib.sha256(json.dumps(model_settings(flat), sort_keys=True).encode()).hexdigest()[:8]
