"""Patch encoders: a registry of architectures, their input transform, and weight loading with provenance.

Encoders
    ``resnet50_trunc``  torchvision ResNet-50 cut after stage 3 (``layer3``), global average pooled:
                        1024-d, the CLAM / MHIM-MIL standard (ImageNet ``IMAGENET1K_V1`` weights).
    ``resnet18``        torchvision ResNet-18 without its classifier: 512-d.
    ``tiny_cnn``        a 3-layer CNN (64-d, 64 px input) for tests and smoke runs; no pretrained weights.
    any other name      a timm model (``timm.create_model(name, num_classes=0)``), including
                        ``hf-hub:ORG/NAME`` models such as UNI when the user has access; the input size
                        and normalisation come from ``timm.data.resolve_data_config``.

Weights (``features.weights`` / ``--weights``)
    ``pretrained``  the encoder's own weights through torchvision / timm (downloaded, or from their cache);
    a path          a local state dict (``.pt``/``.pth`` read with ``torch.load(weights_only=True)``, or
                    ``.safetensors``) for offline sites. Keys must match the architecture; the only keys
                    ignored are those of parts the encoder drops (``layer4.*``/``fc.*`` of a full ResNet-50
                    for ``resnet50_trunc``, the classifier of timm models);
    ``random``      an explicitly random initialisation (seeded, so every worker builds the same network),
                    recorded as such in the encoder key and in every bag.
There is never a silent fallback: weights that cannot be loaded raise :class:`WsiMilError` naming the remedy.

Offline sites
    :func:`pretrained_available` looks for the weights in the local torch-hub / Hugging Face caches without
    touching the network. When ``WSI_MIL_OFFLINE``, ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set
    (``1``/``true``), a cache miss is reported at once instead of attempting a download (the Hugging Face
    client otherwise retries for about a minute before failing), and cached Hugging Face weights are
    loaded without any network request. Without those variables a download is attempted and its failure
    is reported with the same remedy.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_mil.config import FeaturesConfig
from wsi_mil.errors import WsiMilError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFLINE_ENV_VARS = ("WSI_MIL_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
RANDOM_SEED = 0
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_REMEDY = ("pass a local weights file with --weights PATH (features.weights), or --weights random for an "
           "explicitly untrained encoder")


# ------------------------------------------------------------------------------------------ the encoder
@dataclass
class Encoder:
    """A ready-to-run patch encoder (eval mode, no gradients) and everything needed to feed it."""

    name: str
    model: nn.Module
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_source: str
    weights_sha256: str | None
    key: str
    weights: str = "pretrained"
    extra: dict[str, Any] = field(default_factory=dict)

    def transform(self) -> dict[str, Any]:
        """The input transform applied to uint8 RGB patches before the model."""
        return {"input_size": self.input_size, "resize": "bilinear-antialias", "scale": "1/255",
                "mean": list(self.mean), "std": list(self.std)}

    def attrs(self) -> dict[str, Any]:
        """Provenance attributes written into every bag."""
        return {
            "encoder": self.name,
            "encoder_key": self.key,
            "feature_dim": self.dim,
            "weights": self.weights,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256 or "",
            "transform": self.transform(),
            **self.extra,
        }


# ------------------------------------------------------------------------------------------ built-ins
class ResNetTrunk(nn.Module):
    """A torchvision ResNet up to a given stage, globally average pooled (parameter names unchanged)."""

    def __init__(self, resnet: nn.Module, last_stage: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.stages = [f"layer{i}" for i in range(1, last_stage + 1)]
        for name in self.stages:
            self.add_module(name, getattr(resnet, name))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images float [B, 3, H, W] -> pooled features float [B, D]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stages:
            x = getattr(self, name)(x)
        return torch.flatten(self.pool(x), 1)


class TinyCNN(nn.Module):
    """Three strided convolutions + global pooling (64-d); fast enough for unit tests."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, dim, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images float [B, 3, H, W] -> features float [B, dim]."""
        return self.features(x)


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: how to build it (randomly initialised) and how to feed it."""

    name: str
    build: Callable[[], nn.Module]
    dim: int
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    torchvision_weights: str | None = None  # e.g. "ResNet50_Weights.IMAGENET1K_V1"
    pretrained_tag: str = "imagenet"
    ignore_prefixes: tuple[str, ...] = ()  # state-dict keys of dropped parts (ignored when loading)
    description: str = ""


def _resnet50_trunc() -> nn.Module:
    import torchvision

    return ResNetTrunk(torchvision.models.resnet50(weights=None), last_stage=3)


def _resnet18() -> nn.Module:
    import torchvision

    return ResNetTrunk(torchvision.models.resnet18(weights=None), last_stage=4)


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> None:
    """Add (or replace) a named encoder in the registry."""
    _REGISTRY[spec.name] = spec


def list_encoders() -> list[str]:
    """Names of the registered encoders (any timm model name is accepted besides these)."""
    return sorted(_REGISTRY)


register_encoder(EncoderSpec(
    "resnet50_trunc", _resnet50_trunc, dim=1024, input_size=224,
    torchvision_weights="ResNet50_Weights.IMAGENET1K_V1", ignore_prefixes=("layer4.", "fc."),
    description="ImageNet ResNet-50 truncated after layer3, average pooled (CLAM standard)."))
register_encoder(EncoderSpec(
    "resnet18", _resnet18, dim=512, input_size=224,
    torchvision_weights="ResNet18_Weights.IMAGENET1K_V1", ignore_prefixes=("fc.",),
    description="ImageNet ResNet-18 without classifier."))
register_encoder(EncoderSpec(
    "tiny_cnn", TinyCNN, dim=64, input_size=64, description="Tiny CNN for tests; random or file weights only."))


# -------------------------------------------------------------------------------------- weights helpers
def weights_mode(weights: str) -> str:
    """'pretrained', 'random' or 'file' for a ``features.weights`` value."""
    value = weights.strip()
    if value.lower() in ("pretrained", "random"):
        return value.lower()
    return "file"


def _weights_path(weights: str) -> Path:
    path = Path(weights.strip()).expanduser()
    if not path.is_file():
        raise WsiMilError(
            f"weights file {path} does not exist; pass an existing .pt/.pth/.safetensors state dict, "
            "'pretrained' or 'random' to --weights (features.weights)."
        )
    return path


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (memoised on path, size and modification time)."""
    stat = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def offline_mode() -> bool:
    """True when one of ``WSI_MIL_OFFLINE``, ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_ENV_VARS)


def _torch_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")
    return Path(home).expanduser() / "hub"


def _hf_cached(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(_hf_cache_dir()))
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.bin")


@contextlib.contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """Make the Hugging Face client use its cache only (no request at all) while ``enabled``."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module under a fixed seed (random weights identical on every worker and every run)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = dict(obj)
    elif isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "teacher", "net"):
            if isinstance(obj.get(key), dict):
                return _unwrap_state_dict(obj[key], path)
        raise WsiMilError(
            f"weights file {path} holds no state dict of tensors (top-level keys: {sorted(obj)[:8]}); "
            "save one with torch.save(model.state_dict(), PATH)."
        )
    else:
        raise WsiMilError(f"weights file {path} holds a {type(obj).__name__}, not a state dict; "
                          "save one with torch.save(model.state_dict(), PATH).")
    for prefix in ("module.", "_orig_mod."):  # DataParallel / torch.compile wrappers
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a PyTorch file (tensors only: ``weights_only=True``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code objects, wrong format
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise WsiMilError(
            f"weights file {path} cannot be read ({exc.__class__.__name__}: {first}); pass a PyTorch state "
            "dict saved with torch.save(model.state_dict(), PATH) or a .safetensors file."
        ) from None
    return _unwrap_state_dict(obj, path)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, encoder: str,
               ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model`` strictly.

    Every model key must be present and every file key used, except keys under ``ignore_prefixes``
    (parts of the architecture the encoder drops).
    """
    ignored = [k for k in state if k.startswith(ignore_prefixes)] if ignore_prefixes else []
    state = {k: v for k, v in state.items() if k not in set(ignored)}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise WsiMilError(f"weights {source} do not fit encoder {encoder} ({detail}); pass the weights of "
                          "that architecture or choose the matching --encoder.") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise WsiMilError(
            f"weights {source} do not fit encoder {encoder}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}; pass the weights of that architecture "
            "or choose the matching --encoder."
        )
    if ignored:
        log.info("weights %s: ignored %d keys of parts %s drops (%s...)", source, len(ignored), encoder, ignored[0])


# ---------------------------------------------------------------------------------------- naming/keys
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("_")


def _kwargs_suffix(cfg: FeaturesConfig) -> str:
    if not cfg.encoder_kwargs:
        return ""
    text = json.dumps(cfg.encoder_kwargs, sort_keys=True, default=str)
    return "-kw" + hashlib.sha256(text.encode()).hexdigest()[:6]


def encoder_key(cfg: FeaturesConfig) -> str:
    """Directory name of an encoder and its weights (no model is built).

    E.g. ``resnet50_trunc-imagenet``, ``resnet18-random``, ``resnet50_trunc-file-1a2b3c4d`` (first 8 hex
    digits of the file's SHA-256).
    """
    mode = weights_mode(cfg.weights)
    name = cfg.encoder.strip()
    if mode == "file":
        tag = "file-" + file_sha256(_weights_path(cfg.weights))[:8]
    elif mode == "random":
        tag = "random"
    else:
        spec = _REGISTRY.get(name)
        tag = spec.pretrained_tag if spec else "pretrained"
    return f"{_slug(name)}-{tag}{_kwargs_suffix(cfg)}"


# ------------------------------------------------------------------------------------ availability
def _is_hf_name(name: str) -> bool:
    return name.startswith("hf-hub:")


def _timm_cached_weights(name: str) -> Path | None:
    """Where timm would find ``name``'s pretrained weights locally, or None (no network)."""
    if _is_hf_name(name):
        repo = name[len("hf-hub:"):].split("@")[0]
        if _hf_cached(repo, ("config.json",)) is None:
            return None
        return _hf_cached(repo, _HF_WEIGHT_FILES)
    from timm.models import get_pretrained_cfg

    try:
        pcfg = get_pretrained_cfg(name)
    except Exception:
        return None
    if pcfg is None:
        return None
    if pcfg.hf_hub_id:
        files = (pcfg.hf_hub_filename,) if pcfg.hf_hub_filename else _HF_WEIGHT_FILES
        found = _hf_cached(pcfg.hf_hub_id, files)
        if found is not None:
            return found
    if pcfg.url:
        path = _torch_checkpoint_dir() / os.path.basename(pcfg.url.split("?")[0])
        if path.is_file():
            return path
    return None


def _torchvision_weights(spec: EncoderSpec) -> Any:
    import torchvision

    return torchvision.models.get_weight(spec.torchvision_weights)


def pretrained_available(cfg: FeaturesConfig) -> bool:
    """True when ``cfg.encoder``'s pretrained weights are in the local torch-hub / Hugging Face cache.

    Never touches the network; False for encoders without pretrained weights and for unknown names.
    """
    name = cfg.encoder.strip()
    spec = _REGISTRY.get(name)
    if spec is not None:
        if spec.torchvision_weights is None:
            return False
        url = _torchvision_weights(spec).url
        return (_torch_checkpoint_dir() / os.path.basename(url)).is_file()
    return _timm_cached_weights(name) is not None


def _no_pretrained_error(name: str, where: str, cause: str = "") -> WsiMilError:
    because = f" ({cause})" if cause else ""
    offline = " and offline mode is on" if offline_mode() else ""
    return WsiMilError(
        f"pretrained weights of encoder {name!r} are not in the local cache ({where}){offline}{because}; "
        f"download them once where the network is reachable, or {_REMEDY}."
    )


# --------------------------------------------------------------------------------------------- build
def build_encoder(cfg: FeaturesConfig) -> Encoder:
    """Build the configured encoder with its weights, in eval mode, on the CPU.

    Parameters
    ----------
    cfg : FeaturesConfig
        ``encoder`` (registry name, timm name or ``hf-hub:`` id), ``weights`` (``pretrained``,
        ``random`` or a local file), ``encoder_kwargs``.

    Returns
    -------
    Encoder
        The model (uint8-derived, normalised float [B, 3, S, S] -> float [B, D]), its input size S,
        normalisation, feature width D and weights provenance.

    Raises
    ------
    WsiMilError
        When the encoder is unknown or its weights cannot be had (offline, missing or mismatched file).
    """
    name = cfg.encoder.strip()
    if not name:
        raise WsiMilError("features.encoder is empty; name an encoder, e.g. resnet50_trunc.")
    mode = weights_mode(cfg.weights)
    key = encoder_key(cfg)
    spec = _REGISTRY.get(name)
    if spec is not None:
        if cfg.encoder_kwargs:
            raise WsiMilError(f"features.encoder_kwargs applies to timm models only, not to {name}; remove it.")
        encoder = _build_registered(spec, cfg, mode, key)
    else:
        encoder = _build_timm(name, cfg, mode, key)
    encoder.model.eval().requires_grad_(False)
    log.info("encoder %s (%d-d, %d px input), weights: %s", key, encoder.dim, encoder.input_size,
             encoder.weights_source)
    return encoder


def _build_registered(spec: EncoderSpec, cfg: FeaturesConfig, mode: str, key: str) -> Encoder:
    sha: str | None = None
    if mode == "random":
        model = _seeded(spec.build)
        source = f"random (seeded torch.manual_seed({RANDOM_SEED}); untrained)"
    elif mode == "file":
        path = _weights_path(cfg.weights)
        model = spec.build()
        load_state(model, read_weights_file(path), source=f"file {path}", encoder=spec.name,
                   ignore_prefixes=spec.ignore_prefixes)
        sha = file_sha256(path)
        source = f"file:{path.resolve()}"
    else:
        if spec.torchvision_weights is None:
            raise WsiMilError(f"encoder {spec.name!r} has no pretrained weights; {_REMEDY}.")
        weights = _torchvision_weights(spec)
        cached = _torch_checkpoint_dir() / os.path.basename(weights.url)
        if not cached.is_file() and offline_mode():
            raise _no_pretrained_error(spec.name, f"{cached}")
        try:
            state = weights.get_state_dict(progress=False, check_hash=False)
        except Exception as exc:  # no network, proxy, truncated download
            raise _no_pretrained_error(spec.name, f"{cached}", f"download failed: {exc}") from None
        model = spec.build()
        load_state(model, state, source=spec.torchvision_weights, encoder=spec.name,
                   ignore_prefixes=spec.ignore_prefixes)
        sha = file_sha256(cached) if cached.is_file() else None
        source = f"torchvision:{spec.torchvision_weights} {weights.url}"
    return Encoder(name=spec.name, model=model, dim=spec.dim, input_size=spec.input_size, mean=spec.mean,
                   std=spec.std, weights_source=source, weights_sha256=sha, key=key, weights=cfg.weights)


def _timm_unknown(name: str) -> WsiMilError:
    import difflib

    import timm

    close = difflib.get_close_matches(name, list_encoders() + timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return WsiMilError(
        f"unknown encoder {name!r}: not a built-in ({', '.join(list_encoders())}) nor a timm model{hint}. "
        "Use one of those, any name from timm.list_models(), or hf-hub:ORG/NAME."
    )


def _build_timm(name: str, cfg: FeaturesConfig, mode: str, key: str) -> Encoder:
    import timm
    from timm.data import resolve_data_config

    hf = _is_hf_name(name)
    if not hf and not timm.is_model(name):
        raise _timm_unknown(name)
    offline = offline_mode()
    pretrained = mode == "pretrained"
    cached = _timm_cached_weights(name) if pretrained else None
    if pretrained and cached is None and offline:
        raise _no_pretrained_error(name, f"torch hub {_torch_checkpoint_dir()}, Hugging Face {_hf_cache_dir()}")
    if hf and not pretrained and offline and _hf_cached(name[len("hf-hub:"):], ("config.json",)) is None:
        raise WsiMilError(
            f"encoder {name!r} needs its config.json from the Hugging Face hub, which is not cached and offline "
            "mode is on; download the model once where the network is reachable, or use a built-in encoder."
        )
    kwargs = dict(cfg.encoder_kwargs)
    try:
        with _hub_offline(offline):
            if pretrained:
                model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
            else:
                model = _seeded(lambda: timm.create_model(name, pretrained=False, num_classes=0, **kwargs))
    except WsiMilError:
        raise
    except Exception as exc:
        if pretrained:
            raise _no_pretrained_error(name, "timm / Hugging Face cache", f"{exc.__class__.__name__}: {exc}") from None
        raise WsiMilError(f"timm could not build encoder {name!r} ({exc.__class__.__name__}: {exc}); "
                          "check the name and features.encoder_kwargs.") from None
    data_cfg = resolve_data_config({}, model=model)
    size = tuple(data_cfg["input_size"][-2:])
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed is not None and tuple(fixed) != size:  # e.g. encoder_kwargs img_size: the model's own size wins
        size = tuple(int(v) for v in fixed)
    sha: str | None = None
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    if mode == "file":
        path = _weights_path(cfg.weights)
        classifier = pcfg.get("classifier")
        prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier or []))
        load_state(model, read_weights_file(path), source=f"file {path}", encoder=name, ignore_prefixes=prefixes)
        sha = file_sha256(path)
        source = f"file:{path.resolve()}"
    elif mode == "random":
        source = f"random (seeded torch.manual_seed({RANDOM_SEED}); untrained)"
    else:
        origin = pcfg.get("hf_hub_id") or pcfg.get("url") or name
        source = f"timm:{name} {origin}"
        cached = cached or _timm_cached_weights(name)
        sha = file_sha256(cached) if cached is not None else None
    if size[0] != size[1]:
        log.warning("encoder %s expects %s input; patches are resized to %d px squares", name, size, size[0])
    return Encoder(name=name, model=model, dim=int(model.num_features), input_size=int(size[0]),
                   mean=tuple(float(m) for m in data_cfg["mean"]), std=tuple(float(s) for s in data_cfg["std"]),
                   weights_source=source, weights_sha256=sha, key=key, weights=cfg.weights,
                   extra={"timm_version": timm.__version__})
