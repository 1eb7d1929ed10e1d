"""The outcome of one slide in a stage (tiling, embedding): done, reused, skipped or failed, with the reason.

Every slide a stage is asked to handle ends up with one :class:`SlideResult`; ``reused`` means its
output was finished by an earlier run with the same settings and was kept, ``skipped`` that the entry
is not a slide (the reason says why), ``failed`` carries one sentence naming the file and the fix.
The other slides carry on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["pending", "done", "reused", "skipped", "failed"]


@dataclass
class SlideResult:
    """Outcome of one slide in one stage.

    Attributes
    ----------
    slide_id : str
        The slide's id (file stem).
    status : {'pending', 'done', 'reused', 'skipped', 'failed'}
        ``pending`` only while the stage runs.
    reason : str
        Why it was skipped or failed (one sentence naming the file and the fix); empty otherwise.
    n_patches : int
        Patches stored (tiling) or embedded (embedding).
    output : Path or None
        The slide's output: its patch store (tiling) or its HDF5 bag (embedding).
    seconds : float
        Wall time spent on the slide.
    """

    slide_id: str
    status: Status = "pending"
    reason: str = ""
    n_patches: int = 0
    output: Path | None = None
    seconds: float = 0.0

    @property
    def error(self) -> str:
        """The failure message ("" unless failed)."""
        return self.reason if self.status == "failed" else ""
