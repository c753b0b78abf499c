"""The file ``unhans audit --select`` writes and the corrections read: which dataset rows carry the artifact.

Its own module, with nothing heavy imported, so the CLI's other commands do not load the audit to read two names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SAMPLES_FILE = "samples.npz"  # what --select writes into the audit's folder: the rows export --samples fits the CAV on


@dataclass(frozen=True)
class SamplesArrays:
    """The arrays of ``SAMPLES_FILE``, written by ``unhans audit --select`` and read by ``unhans export`` and
    ``unhans aclarc --samples``: ``artifact`` and ``clean``, dataset rows (indices, or one boolean per row) with the
    artifact and without it; ``regions``, one mask (H, W) per artifact row in row order, the pixels holding half its
    positive input relevance (audit.clusters.region), which ``unhans aclarc`` pastes into other images; ``data``, the
    :func:`data_fingerprint` of the images the rows count, so that a file from an audit of other data is refused
    rather than fitting a CAV on the wrong images (files written before it carry none, and are checked by size only)."""

    artifact: str = "artifact"
    clean: str = "clean"
    regions: str = "regions"
    data: str = "data"


SAMPLES = SamplesArrays()


def data_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of the images' and labels' bytes: what an audit's rows are rows of (audit.json's ``inputs.data``)."""
    return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
