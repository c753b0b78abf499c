"""Which cluster of a class is the artifact: the one whose explanations pile up on the same few pixels."""

from __future__ import annotations

import numpy as np

from unhans.core.spray import ClassResult


def concentration(relevance: np.ndarray, top: float = 0.02) -> float:
    """Share of the absolute mean relevance (channels summed) that falls on the top ``top`` share of pixels.

    An artifact is small and the same in every member of its cluster, so the cluster's mean map piles up on a few
    pixels; a real object's varies in shape and position and spreads out.
    """
    magnitude = np.abs(relevance.reshape(len(relevance), -1, *relevance.shape[-2:]).sum(axis=1).mean(axis=0)).ravel()
    count = max(1, int(round(top * magnitude.size)))
    return float(np.sort(magnitude)[-count:].sum() / max(magnitude.sum(), 1e-12))


def artifact_cluster(result: ClassResult, relevance: np.ndarray) -> tuple[int, list[float]]:
    """The cluster of a class most likely to be the artifact (the most concentrated one) and every cluster's figure."""
    figures = [concentration(relevance[result.indices[result.labels == c]]) for c in range(result.n_clusters)]
    return int(np.argmax(figures)), figures
