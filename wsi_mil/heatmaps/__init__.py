"""Per-slide heatmaps from per-patch scores and level-0 coordinates (no model code).

Inputs are what the earlier stages already saved: patch coordinates (level-0 x, y of each patch's
top-left corner), ``patch_size_level0`` and one score per patch (attention, instance probability...).
Nothing here re-extracts features.

Outputs per slide (:func:`render_slide_heatmap`):

``<id>.png``          overlay on the slide thumbnail: colour map over the scored patches only, tissue
                      outline, colour bar with its label;
``<id>.geojson``      one Polygon per patch in level-0 pixels with its score; QuPath imports it
                      (File > Import objects) and colours it by class, one class per score bin;
``<id>_topk.png``     montage of the k highest-scoring patches, read from the patch store;
``<id>_heatmap.tif``  optional tiled pyramidal TIFF for slide viewers.

Modules, in the order a slide's scores go through them: ``normalise`` (scores -> [0, 1]),
``rasterise`` (patch squares -> thumbnail grid; the geometry rule), ``render`` (colour map blended
over the thumbnail, PNG), ``geojson`` (QuPath polygons), ``montage`` (top-k patches), ``tiff``
(pyramidal TIFF), ``slide`` (the thumbnail and every file of one slide).
"""

from wsi_mil.heatmaps.geojson import scores_geojson, write_geojson
from wsi_mil.heatmaps.montage import top_k_indices, top_k_montage
from wsi_mil.heatmaps.normalise import NORMALIZE_METHODS, normalize_scores
from wsi_mil.heatmaps.rasterise import patch_pixel_bounds, score_grid
from wsi_mil.heatmaps.render import overlay_rgb, render_overlay
from wsi_mil.heatmaps.slide import SlideHeatmap, render_slide_heatmap
from wsi_mil.heatmaps.tiff import pyramid_levels, write_pyramidal_tiff

__all__ = [
    "NORMALIZE_METHODS",
    "SlideHeatmap",
    "normalize_scores",
    "overlay_rgb",
    "patch_pixel_bounds",
    "pyramid_levels",
    "render_overlay",
    "render_slide_heatmap",
    "score_grid",
    "scores_geojson",
    "top_k_indices",
    "top_k_montage",
    "write_geojson",
    "write_pyramidal_tiff",
]
