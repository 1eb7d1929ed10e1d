"""wsi-mil: whole-slide images to multiple-instance-learning models, tracked in MLflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsi-mil")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
