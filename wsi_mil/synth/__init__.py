"""Synthetic H&E-like whole-slide images with ground truth (see :mod:`wsi_mil.synthetic` for the API).

Modules: ``noise`` (deterministic hashing, textures, interpolation), ``fields`` (low-resolution
tissue/tumour/artefact fields of one slide), ``render`` (level-0 pixels of any region, on demand),
``pyramid`` (streaming Aperio SVS / generic pyramidal TIFF writer), ``cohort`` (slides, truth files,
labels.csv).
"""
