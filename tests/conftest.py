"""Shared pytest setup: everything offline, quiet, and on CPU-friendly thread counts."""

from __future__ import annotations

import os

# Nothing in the tests may reach the network: make the hubs fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WSI_MIL_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
