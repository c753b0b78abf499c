"""The file ``unhans audit --select`` writes and the corrections read: which dataset rows carry the artifact.

Its own module, with nothing heavy imported, so the CLI's other commands do not load the audit to read two names.
"""

from __future__ import annotations

from dataclasses import dataclass

SAMPLES_FILE = "samples.npz"  # what --select writes into the audit's folder: the rows export --samples fits the CAV on


@dataclass(frozen=True)
class SamplesArrays:
    """The arrays of ``SAMPLES_FILE``, written by ``unhans audit --select`` and read by ``unhans export`` and
    ``unhans aclarc --samples``: ``artifact`` and ``clean``, dataset rows (indices, or one boolean per row) with the
    artifact and without it; ``regions``, one mask (H, W) per artifact row in row order, the pixels holding half its
    positive input relevance (audit.clusters.region), which ``unhans aclarc`` pastes into other images."""

    artifact: str = "artifact"
    clean: str = "clean"
    regions: str = "regions"


SAMPLES = SamplesArrays()
