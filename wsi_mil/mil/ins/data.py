"""INS inputs: instances sampled across bags, feature-view augmentation, and RGB patches read from the
Zarr patch stores for the end-to-end variant."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from wsi_mil.errors import WsiMilError
from wsi_mil.mil.base import BagItem
from wsi_mil.stores import PatchStore, open_patch_store, read_bag_attrs

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------- instance index
@dataclass
class InstanceIndex:
    """Every training instance as (bag, row), with its bag label: the unit INS samples from."""

    bag: np.ndarray  # [M] bag position in the training list
    row: np.ndarray  # [M] row inside the bag
    bag_label: np.ndarray  # [M] 0/1

    @classmethod
    def from_bags(cls, bags: Sequence[BagItem], sizes: Sequence[int] | None = None) -> InstanceIndex:
        """Index the instances of ``bags`` (sizes default to the feature rows)."""
        sizes = [int(b.features.shape[0]) for b in bags] if sizes is None else [int(s) for s in sizes]
        bag = np.concatenate([np.full(n, i, dtype=np.int64) for i, n in enumerate(sizes)] or [np.zeros(0, np.int64)])
        row = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes] or [np.zeros(0, np.int64)])
        labels = np.asarray([int(b.label) for b in bags], dtype=np.int64)
        return cls(bag=bag, row=row, bag_label=labels[bag] if bag.size else np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.bag.shape[0])

    def epoch_order(self, rng: np.random.Generator, max_instances: int | None,
                    positive_only: bool = False) -> np.ndarray:
        """A shuffled permutation of instance ids (a random subset when ``max_instances`` is set);
        ``positive_only``: the instances of positive bags only (the reference's warm-up)."""
        ids = np.flatnonzero(self.bag_label == 1) if positive_only else np.arange(len(self))
        order = ids[rng.permutation(ids.shape[0])]
        return order[:max_instances] if max_instances else order


def batches(order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive batches of ``order``; a trailing batch of one instance is dropped."""
    for start in range(0, order.shape[0], batch_size):
        chunk = order[start:start + batch_size]
        if chunk.shape[0] >= 2:
            yield chunk


def gather_features(bags: Sequence[BagItem], index: InstanceIndex, ids: np.ndarray, device: torch.device) -> Tensor:
    """Features [B, D] of instances ``ids`` (gathered bag by bag, in the order of ``ids``)."""
    bag_ids = index.bag[ids]
    rows = index.row[ids]
    order = np.argsort(bag_ids, kind="stable")
    parts = []
    sorted_bags = bag_ids[order]
    bounds = np.flatnonzero(np.diff(sorted_bags)) + 1
    for group in np.split(order, bounds):
        b = int(bag_ids[group[0]])
        feats = bags[b].features
        parts.append(feats[torch.as_tensor(rows[group], device=feats.device)].to(device, torch.float32))
    out = torch.cat(parts, dim=0)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.shape[0])
    return out[torch.as_tensor(inverse, device=out.device)]


# --------------------------------------------------------------------------------------- feature views
@dataclass
class FeatureNormalizer:
    """Per-dimension standardisation fitted on training instances."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, bags: Sequence[BagItem], device: torch.device) -> FeatureNormalizer:
        """Streaming mean/std over every instance of ``bags``."""
        total, sq, n = None, None, 0
        for b in bags:
            x = b.features.to(device, torch.float64)
            total = x.sum(0) if total is None else total + x.sum(0)
            sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
            n += x.shape[0]
        if total is None or sq is None or n == 0:
            raise WsiMilError("INS: the training split has no instances; check the bags of this fold.")
        mean = total / n
        var = (sq / n - mean * mean).clamp_min(0.0)
        return cls(mean.float(), var.sqrt().float().clamp_min(1e-6))

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def feature_view(x: Tensor, dropout: float, noise: float) -> Tensor:
    """One random view of (standardised) features: element dropout then additive Gaussian noise."""
    if dropout > 0:
        x = F.dropout(x, p=dropout, training=True)
    if noise > 0:
        x = x + noise * torch.randn_like(x)
    return x


# -------------------------------------------------------------------------------------------- patches
def patch_store_of(bag_path: Path) -> Path:
    """The patch store a feature bag was extracted from (its ``patch_store`` attribute)."""
    bag_path = Path(bag_path)
    attrs = read_bag_attrs(bag_path)
    value = attrs.get("patch_store")
    if not value:
        raise WsiMilError(f"feature bag {bag_path} does not record its patch store; re-run `wsi-mil extract` "
                          "(the INS 'patches' variant reads RGB patches through it).")
    path = Path(str(value))
    if not path.is_absolute() and not path.exists():
        path = bag_path.parent / path
    return path


@dataclass
class PatchBag:
    """A bag's RGB patches: the store and, for each bag row, its row in the store."""

    store: PatchStore
    store_rows: np.ndarray  # [N]

    @property
    def chunk_len(self) -> int:
        return int(self.store.patches.chunks[0])

    def read(self, bag_rows: np.ndarray, cache: ChunkCache | None = None) -> np.ndarray:
        """Patches [len(bag_rows), P, P, 3] uint8, reading each needed chunk once (or from ``cache``)."""
        rows = self.store_rows[np.asarray(bag_rows, dtype=np.int64)]
        out = np.empty((rows.shape[0], *self.store.patches.shape[1:]), dtype=np.uint8)
        chunk = self.chunk_len
        keys = rows // chunk
        for key in np.unique(keys):
            sel = np.flatnonzero(keys == key)
            start = int(key) * chunk
            block = cache.get((str(self.store.path), int(key))) if cache is not None else None
            if block is None:
                block = np.asarray(self.store.patches[start:min(start + chunk, self.store.patches.shape[0])])
                if cache is not None:
                    cache.put((str(self.store.path), int(key)), block)
            out[sel] = block[rows[sel] - start]
        return out


class ChunkCache:
    """The last few decompressed patch chunks (least recently used evicted)."""

    def __init__(self, max_chunks: int) -> None:
        self.max_chunks = max(1, int(max_chunks))
        self._items: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        block = self._items.get(key)
        if block is not None:
            self._items.move_to_end(key)
        return block

    def put(self, key: tuple[str, int], block: np.ndarray) -> None:
        self._items[key] = block
        self._items.move_to_end(key)
        while len(self._items) > self.max_chunks:
            self._items.popitem(last=False)


def open_patch_bag(bag: BagItem, bag_path: Path) -> PatchBag:
    """Match a bag's rows to its patch store's rows (by coordinates when both are known)."""
    store_path = patch_store_of(bag_path)
    store = open_patch_store(store_path)
    n = int(bag.features.shape[0])
    if bag.coords is None:
        if len(store) != n:
            raise WsiMilError(f"patch store {store_path} has {len(store)} patches but bag {bag_path} has {n}; "
                              "re-run `wsi-mil extract` for this slide.")
        return PatchBag(store, np.arange(n, dtype=np.int64))
    coords = np.asarray(bag.coords, dtype=np.int64).reshape(-1, 2)
    if coords.shape[0] == len(store) and np.array_equal(coords, store.coords):
        return PatchBag(store, np.arange(n, dtype=np.int64))
    lookup = {(int(x), int(y)): i for i, (x, y) in enumerate(store.coords)}
    try:
        rows = np.asarray([lookup[(int(x), int(y))] for x, y in coords], dtype=np.int64)
    except KeyError:
        raise WsiMilError(f"bag {bag_path} has coordinates missing from patch store {store_path}; the store "
                          "was re-tiled after extraction: re-run `wsi-mil extract`.") from None
    return PatchBag(store, rows)


def instance_chunks(index: InstanceIndex, patch_bags: Sequence[PatchBag]) -> np.ndarray:
    """The store chunk [M] holding each instance's patch."""
    out = np.empty(len(index), dtype=np.int64)
    for b, pb in enumerate(patch_bags):
        sel = np.flatnonzero(index.bag == b)
        out[sel] = pb.store_rows[index.row[sel]] // pb.chunk_len
    return out


def chunked_order(order: np.ndarray, index: InstanceIndex, chunk_of: np.ndarray,
                  rng: np.random.Generator, window_chunks: int) -> np.ndarray:
    """Reorder shuffled instance ids so batches read few store chunks.

    Instances are grouped by (bag, store chunk) (``chunk_of`` from :func:`instance_chunks`); the groups
    are shuffled and consecutive windows of ``window_chunks`` groups are shuffled internally, so each
    batch mixes several bags while every chunk is decompressed about once per epoch.
    """
    chunk_ids = chunk_of[order]
    keys = index.bag[order] * (1 << 32) + chunk_ids
    uniq, inverse = np.unique(keys, return_inverse=True)
    perm = rng.permutation(uniq.shape[0])
    rank = np.empty_like(perm)
    rank[perm] = np.arange(perm.shape[0])
    group_rank = rank[inverse]
    window = group_rank // max(1, window_chunks)
    tiebreak = rng.random(order.shape[0])
    return order[np.lexsort((tiebreak, window))]


def gather_patches(patch_bags: Sequence[PatchBag], index: InstanceIndex, ids: np.ndarray,
                 cache: ChunkCache | None = None) -> np.ndarray:
    """Patches [B, P, P, 3] of instance ids (in the order of ``ids``), gathered from their patch stores."""
    first = patch_bags[int(index.bag[ids[0]])].store.patches
    out = np.empty((ids.shape[0], *first.shape[1:]), dtype=np.uint8)
    bag_ids = index.bag[ids]
    for b in np.unique(bag_ids):
        sel = np.flatnonzero(bag_ids == b)
        out[sel] = patch_bags[int(b)].read(index.row[ids[sel]], cache)
    return out


class PatchAugment:
    """Random view of uint8 patches: random resized crop, flips, colour jitter (torchvision v2), then
    float conversion and ImageNet normalisation. Each patch gets its own random parameters."""

    def __init__(self, size: int, crop_scale: float, jitter: float) -> None:
        from torchvision.transforms import v2

        steps = [v2.RandomResizedCrop(size, scale=(crop_scale, 1.0), antialias=True),
                 v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        if jitter > 0:
            steps.append(v2.ColorJitter(jitter, jitter, jitter, min(0.5, jitter / 4)))
        self.transform = v2.Compose(steps)

    def __call__(self, patches: Tensor) -> Tensor:
        """patches: uint8 [B, 3, P, P] -> normalised float [B, 3, P, P]."""
        views = torch.stack([self.transform(p) for p in patches])
        return normalize_patches(views)


def normalize_patches(patches: Tensor) -> Tensor:
    """uint8 [B, 3, P, P] -> float, ImageNet-normalised."""
    x = patches.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_chw(patches: np.ndarray, device: torch.device) -> Tensor:
    """uint8 [B, P, P, 3] numpy -> uint8 [B, 3, P, P] tensor."""
    return torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).contiguous().to(device)
