"""Batched, device-aware feature extraction: Zarr patch stores -> per-slide HDF5 bags.

Pipeline on one device (:func:`extract_cohort` without a scheduler)
    * Each slide's store is cut into *blocks* of whole Zarr chunks (about one batch each), so a read
      never decodes a chunk twice and there is no per-patch overhead.
    * One reader streams the blocks of *all* slides in order, ahead of the compute: a ``DataLoader``
      with worker processes (stores opened lazily per worker, pinned memory, prefetch) on a GPU, a
      background thread on the CPU. The next slide is therefore read while the current one is embedded.
    * On the device: uint8 -> float, resize to the encoder's input size (bilinear, antialiased),
      normalise; on CUDA also channels_last and autocast (bfloat16 where supported, else float16);
      always ``torch.inference_mode``. A batch that runs out of memory is retried with half the batch
      size, down to one patch.
    * Finished slides are checked (no NaN/inf) and written by a writer thread, atomically
      (:func:`wsi_mil.stores.write_bag`), to ``OUT/features/<tiling>/<encoder>/<slide_id>.h5``.

Resume
    A bag whose attributes match (same encoder key, same patch store signature, same precision, same
    patch count) is reused; leftovers of interrupted writes are deleted; anything else is redone.

Scale-out (``--scheduler tcp://HOST:PORT`` / ``compute.scheduler``)
    One Dask task per slide through :func:`wsi_mil.compute.dask_client`. When the cluster's workers
    advertise a ``GPU`` resource (``dask worker ... --resources "GPU=1"``, one worker per GPU, each with
    its own ``CUDA_VISIBLE_DEVICES``) every task asks for ``resources={"GPU": 1}``, so a GPU embeds one
    slide at a time; otherwise tasks are plain. Each worker builds the encoder once and keeps it. The
    output directory must be on a file system shared by the client and the workers.

Modules, in the order a slide goes through them: ``planning`` (what to embed, resume), ``reader``
(patch blocks read ahead), ``embedder`` (the encoder on one device), ``device`` (jobs on one device,
bags written), ``cluster`` (jobs on a Dask cluster), ``cohort`` (the stage: :func:`extract_cohort`).
"""

from wsi_mil.extract.cohort import ExtractReport, extract_cohort
from wsi_mil.extract.embedder import Embedder, embed_patches
from wsi_mil.extract.planning import bag_is_current, pt_path, store_signature

__all__ = ["Embedder", "ExtractReport", "bag_is_current", "embed_patches", "extract_cohort", "pt_path", "store_signature"]
