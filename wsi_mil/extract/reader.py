"""Reading patch stores ahead of the forward pass: blocks of whole Zarr chunks, in order, in the background.

One reader streams the blocks of *all* slides in order, ahead of the compute: a ``DataLoader`` with
worker processes (stores opened lazily per worker, pinned memory, prefetch) on a GPU, a background
thread on the CPU. The next slide is therefore read while the current one is embedded.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsi_mil.config import FeaturesConfig
from wsi_mil.errors import is_slide_problem, name_slide


class PatchBlocks(Dataset):
    """One item = one block of consecutive patches of one slide: ``(slide_index, start, uint8 tensor, error)``.

    Stores are opened lazily in whichever process reads (never pickled open); a read error is returned
    as a message so that one corrupt chunk fails its slide, not the whole stream; any other error (a
    bug, a full disk: :func:`wsi_mil.errors.is_slide_problem`) propagates with the store named.
    """

    def __init__(self, stores: list[Path], blocks: list[tuple[int, int, int]]) -> None:
        self.stores = [str(s) for s in stores]
        self.blocks = blocks
        self._arrays: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    def _array(self, slide: int) -> Any:
        if slide not in self._arrays:
            import zarr

            self._arrays = {slide: zarr.open_group(self.stores[slide], mode="r")["patches"]}  # one open at a time
        return self._arrays[slide]

    def __getitem__(self, index: int) -> tuple[int, int, torch.Tensor, str]:
        slide, start, stop = self.blocks[index]
        try:
            data = np.ascontiguousarray(self._array(slide)[start:stop])
            return slide, start, torch.from_numpy(data), ""
        except Exception as exc:
            if not is_slide_problem(exc):  # a bug or a resource error: not this store's fault
                name_slide(exc, self.stores[slide], f"reading patches {start}-{stop - 1}")
                raise
            return slide, start, torch.empty(0, dtype=torch.uint8), f"{exc.__class__.__name__}: {exc}"


def block_spans(n_patches: int, chunk: int, batch_size: int) -> list[tuple[int, int]]:
    """Chunk-aligned ranges covering ``n_patches``, each about ``batch_size`` patches (at least one chunk)."""
    step = chunk * max(1, round(batch_size / chunk))
    return [(s, min(s + step, n_patches)) for s in range(0, n_patches, step)]


_END = object()


def _threadopen_reader(dataset: PatchBlocks, depth: int, pin: bool) -> Iterator[tuple[int, int, torch.Tensor, str]]:
    """Read ``dataset`` in order in a background thread, ``depth`` items ahead."""
    items: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            for index in range(len(dataset)):
                if stop.is_set():
                    return
                slide, start, data, error = dataset[index]
                if pin and data.numel():
                    data = data.pin_memory()
                put((slide, start, data, error))
        except BaseException as exc:  # a bug or a resource error: raised again in the consuming thread
            put(exc)
        finally:
            put(_END)

    thread = threading.Thread(target=work, name="wsi-mil-patch-reader", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def open_reader(dataset: PatchBlocks, device: torch.device, cfg: FeaturesConfig, processes: bool) -> Iterator[Any]:
    """Blocks of ``dataset`` in order: DataLoader worker processes for a GPU, else a background thread."""
    if processes and device.type != "cpu" and cfg.num_workers > 0 and len(dataset) > 1:
        loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda", prefetch_factor=cfg.prefetch)
        return iter(loader)
    return _threadopen_reader(dataset, cfg.prefetch, pin=device.type == "cuda")
