"""Running an encoder on uint8 patches on one device (resize, normalise, autocast, out-of-memory retry)."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
import torch.nn.functional as F

from wsi_mil.devices import resolve_device
from wsi_mil.encoders import Encoder
from wsi_mil.errors import SlideError

log = logging.getLogger(__name__)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


class Embedder:
    """Runs an encoder on uint8 patches [n, P, P, 3] on one device.

    Resizing and normalisation happen on the device; CUDA adds channels_last and autocast. A batch
    that runs out of memory is retried with half the batch size (kept for later batches), down to 1.
    """

    def __init__(self, encoder: Encoder, device: str | torch.device = "auto", *, batch_size: int = 64,
                 amp: bool = True) -> None:
        self.encoder = encoder
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        cuda = self.device.type == "cuda"
        self.channels_last = cuda
        self.amp_dtype: torch.dtype | None = None
        if cuda and amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.model = encoder.model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        mean = torch.tensor(encoder.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(encoder.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (-mean / std).to(self.device)

    @property
    def amp_name(self) -> str:
        """The autocast dtype's name (``bfloat16``, ``float16``) or ``none``."""
        return str(self.amp_dtype).replace("torch.", "") if self.amp_dtype is not None else "none"

    def preprocess(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC on any device -> normalised float NCHW at the encoder's input size on ``self.device``."""
        x = patches.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        size = self.encoder.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x * self._scale + self._shift
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    @torch.inference_mode()
    def _forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(patches)
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            y = self.model(x)
        if y.ndim != 2 or y.shape[1] != self.encoder.dim:
            raise SlideError(f"encoder {self.encoder.name} returned shape {tuple(y.shape)}, expected "
                             f"[n, {self.encoder.dim}]; choose a model that pools to a vector.")
        return y.float()

    def __call__(self, patches: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Features [n, D] float32, left on the device."""
        if isinstance(patches, np.ndarray):
            patches = torch.from_numpy(np.ascontiguousarray(patches))
        if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != torch.uint8:
            raise ValueError(f"patches must be uint8 [N, P, P, 3], got {patches.dtype} {tuple(patches.shape)}")
        parts: list[torch.Tensor] = []
        start = 0
        while start < patches.shape[0]:
            size = self.batch_size
            try:
                parts.append(self._forward(patches[start:start + size]))
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                _empty_cache(self.device)
                if size == 1:
                    raise SlideError(f"out of memory on {self.device} even for a single patch with encoder "
                                     f"{self.encoder.name}; use a smaller encoder or --device cpu.") from None
                self.batch_size = max(1, size // 2)
                log.warning("out of memory on %s with batch %d; retrying with batch %d", self.device, size,
                            self.batch_size)
                continue
            start += size
        if not parts:
            return torch.empty(0, self.encoder.dim, device=self.device)
        return torch.cat(parts)


def embed_patches(encoder: Encoder, patches: np.ndarray | torch.Tensor, device: str | torch.device = "auto",
                  *, batch_size: int = 64, amp: bool = True) -> np.ndarray:
    """Embed uint8 patches [N, P, P, 3] with exactly the transform the extractor uses: float32 [N, D]."""
    return Embedder(encoder, device, batch_size=batch_size, amp=amp)(patches).cpu().numpy()
