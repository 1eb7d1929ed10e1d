"""INS networks: a backbone (MLP on frozen features, or a CNN on RGB patches), the instance
classifier ``cls`` and the L2-normalised projection head ``proj``; plus the EMA key-encoder update."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsi_mil.errors import WsiMilError

logger = logging.getLogger(__name__)

CNN_BACKBONES = ("tiny_cnn", "resnet18", "resnet34", "resnet50")


def feature_backbone(in_dim: int, width: int) -> nn.Module:
    """The feature-level backbone: Linear(D -> width) + ReLU."""
    return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(inplace=True))


def tiny_cnn() -> tuple[nn.Module, int]:
    """A three-layer CNN (64-d output) for CPU tests and tiny patches."""
    layers: list[nn.Module] = []
    channels = [3, 16, 32, 64]
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels[-1]


def cnn_backbone(name: str, weights: str | None = None) -> tuple[nn.Module, int]:
    """A randomly initialised CNN trunk (classifier removed) and its output width.

    ``weights`` is an optional local state-dict file (e.g. ImageNet or pathology weights saved with
    ``torch.save(model.state_dict())``); nothing is downloaded.
    """
    if name == "tiny_cnn":
        model, width = tiny_cnn()
    elif name in CNN_BACKBONES:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        width = int(model.fc.in_features)
        model.fc = nn.Identity()
    else:
        raise WsiMilError(f"model.ins.backbone '{name}' is not supported; use one of {', '.join(CNN_BACKBONES)}.")
    if weights:
        _load_weights(model, Path(weights))
    return model, width


def _load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise WsiMilError(f"model.ins.backbone_weights: file {path} does not exist; fix the path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a user-facing file problem
        raise WsiMilError(f"model.ins.backbone_weights: {path} is not a torch state dict ({exc}).") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone.", "encoder."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    own = model.state_dict()
    usable = {k: v for k, v in cleaned.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise WsiMilError(f"model.ins.backbone_weights: no tensor in {path} fits the backbone; check the architecture.")
    model.load_state_dict(usable, strict=False)
    logger.info("loaded %d/%d backbone tensors from %s", len(usable), len(own), path)


class INSNet(nn.Module):
    """backbone -> f; ``cls``: Linear(f -> 2); ``proj``: Linear(f, f) -> ReLU -> Linear(f, embed), L2-normalised."""

    def __init__(self, backbone: nn.Module, width: int, embed_dim: int, n_classes: int = 2) -> None:
        super().__init__()
        self.backbone = backbone
        self.cls = nn.Linear(width, n_classes)
        self.proj = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, embed_dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Instance logits [B, 2] and normalised embeddings [B, embed]."""
        f = self.backbone(x)
        return self.cls(f), F.normalize(self.proj(f), dim=1)

    def classify(self, x: Tensor) -> Tensor:
        """Instance logits only (inference)."""
        return self.cls(self.backbone(x))


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * source`` for every parameter."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
