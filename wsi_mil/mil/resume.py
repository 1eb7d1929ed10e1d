"""Resuming a killed `wsi-mil train`: its RUNNING runs are marked KILLED and its finished folds are kept.

A training parent run records who runs it (tag ``wsi_mil.owner``: host, process id and start time)
and what it trains (tag ``wsi_mil.resume_key``: a hash of the model and training settings, the data
fingerprint and the splits). When a training starts, every RUNNING run of the experiment whose owner
is a dead process of this host (:func:`wsi_mil.locks.process_alive`) is stale: its RUNNING fold runs
are marked KILLED; a stale parent with the same resume key is taken over (the new owner recorded)
and its FINISHED fold runs are reused, so the training goes on at the first unfinished fold; other
stale parents are marked KILLED. Runs of live processes, and of other hosts, are left alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pandas as pd

from wsi_mil.config import Config
from wsi_mil.locks import Owner, process_alive
from wsi_mil.tracking import FOLD_TAG, PARENT_TAG, ROLE_TAG, SEED_TAG, RunRecord, Tracker

log = logging.getLogger(__name__)

OWNER_TAG = "wsi_mil.owner"
RESUME_TAG = "wsi_mil.resume_key"


def resume_key(cfg: Config, fingerprint: str, splits: pd.DataFrame) -> str:
    """Hash of what a training's fold results depend on: model and training settings, data, splits."""
    settings = cfg.model_dump(mode="json", include={"model", "training"})
    for volatile in ("threads", "progress", "device", "cache_bags", "cache_max_gb"):
        settings["training"].pop(volatile, None)
    key = ["seed", "fold", "slide_id", "role"]
    table = splits[key].astype(str).sort_values(key).to_csv(index=False) if set(key) <= set(splits) else ""
    text = json.dumps({"settings": settings, "data": fingerprint, "splits": table}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def owner_tags() -> dict[str, str]:
    """The ``wsi_mil.owner`` tag of a run this process runs."""
    me = Owner.me()
    return {OWNER_TAG: json.dumps({"host": me.host, "pid": os.getpid(), "started": me.started})}


def _dead(run: RunRecord) -> bool:
    """A RUNNING run whose recorded owner is a process of this host that no longer runs."""
    try:
        data = json.loads(run.tags[OWNER_TAG])
        owner = Owner(str(data["host"]), int(data["pid"]), float(data["started"]), "")
    except (KeyError, ValueError, TypeError):
        return False  # no owner recorded: nothing proves it is gone
    return process_alive(owner) is False


def take_over_stale(tracker: Tracker, experiment_id: str, key: str) -> str | None:
    """Mark the experiment's stale runs KILLED; return the stale parent with resume key ``key`` to resume, if any.

    The returned parent stays RUNNING and gets this process as its owner; its RUNNING fold runs are
    KILLED (see the module docstring).
    """
    runs = tracker.client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
    records = [RunRecord(r.info.run_id, r.info.run_name or "", r.info.status, r.info.experiment_id,
                         dict(r.data.params), dict(r.data.metrics), dict(r.data.tags)) for r in runs]
    stale = [r for r in records if r.tags.get(ROLE_TAG) == "cv" and _dead(r)]
    stale_ids = {r.run_id for r in stale}
    resumed = next((r.run_id for r in stale if r.tags.get(RESUME_TAG) == key), None)
    for run in records:
        if run.tags.get(PARENT_TAG) in stale_ids:
            tracker.end_run(run.run_id, "KILLED")
    for run in stale:
        if run.run_id == resumed:
            tracker.set_tags(run.run_id, owner_tags())
        else:
            tracker.end_run(run.run_id, "KILLED")
    if stale:
        log.info("marked %d run(s) of killed trainings KILLED%s", len(stale) - (resumed is not None),
                 f"; resuming run {resumed}" if resumed else "")
    return resumed


def finished_folds(tracker: Tracker, parent_id: str) -> dict[tuple[int, int], RunRecord]:
    """The FINISHED fold runs under ``parent_id`` by (seed, fold) (the newest one of each)."""
    done: dict[tuple[int, int], RunRecord] = {}
    for run in sorted(tracker.child_runs(parent_id), key=lambda r: r.run_id):
        if run.tags.get(ROLE_TAG) == "fold" and run.status == "FINISHED":
            done[(int(run.tags[SEED_TAG]), int(run.tags[FOLD_TAG]))] = run
    return done
