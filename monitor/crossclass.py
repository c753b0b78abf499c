"""Is served traffic, all classes together, explained by a strategy the trusted reference never showed?

The per-class test (:mod:`unhans.monitor.detector`) needs tens of samples of a class in a window and in the reference;
a model of 1,000 classes gets a handful per class per window. This test needs neither: each sample is described by
what its decision rests on in a form that does not depend on the class, the relevance at the archive's monitor layer
per channel (:func:`describe`: the share of the sample's positive relevance each channel holds, square-rooted, so
Euclidean distances are Hellinger distances between those shares), and a window is compared with the reference as a
whole. Three pieces of evidence, each oriented so that larger means "more drift":

* ``shift``: Hotelling's T² of the window's mean descriptor against the reference's, whitened by the reference's
  covariance (Ledoit-Wolf shrinkage: there are about as many channels as trusted samples), per degree of freedom. A
  new strategy in a share p of the traffic moves the mean by p·δ; whitening finds δ where the reference's own spread
  is small (measured: the ImageNet-W watermark's δ lies mostly in low-variance directions, BENCHMARKS.md).
* ``channel_shift``: the largest standardised shift of one channel's mean: relevance moving onto a few channels.
* ``novelty``: the share of window samples farther from their 5 nearest reference samples than 95% of the reference
  samples are from theirs (leave-one-group-out), as a z-score against 5%: explanations outside the reference's support.

None has a trustworthy null distribution (relevance is not Gaussian, traffic repeats photos), so each is calibrated
as the per-class test is: the reference's groups (one per trusted photo; its augmented views share it) are split at
random into a pseudo-reference and a pseudo-window many times, each statistic becomes a robust z-score against those
draws, the drift score is their largest z, and the threshold is set from the draws' drift scores to the stated
false-alarm rate (:func:`unhans.monitor.detector.tail_threshold`). Each statistic is normalised by the window and
reference sizes, so draws smaller than a window calibrate it; the pseudo-reference, half the reference, is noisier
than the whole, which makes the threshold conservative, not lax.

Samples the deployed correction's detector flags (the known artifact) are left out of this test, in the window and in
the reference: that artifact is reported as a warning of its own (:func:`unhans.monitor.detector.known_artifact_share`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors

from unhans.core.errors import InputError

from .detector import MAD_TO_SIGMA, NullModel, Verdict, tail_threshold

EVIDENCE = ("shift", "channel_shift", "novelty")
NOVEL_QUANTILE = 0.95  # a sample is novel beyond this quantile of the reference's own distances
MIN_REFERENCE = 60  # fewer trusted samples (with a monitor layer) than this cannot calibrate the test
MIN_WINDOW = 20  # fewer usable samples in a window are not tested
MIN_SCALE = 0.1  # the smallest spread of a statistic's resampled draws that a z-score divides by


def describe(latent: np.ndarray) -> np.ndarray:
    """Per-channel relevance (N, C) as class-comparable descriptors (N, C): each sample's positive relevance per
    channel as a share of its total, square-rooted. A sample with no positive relevance is all zeros."""
    positive = np.clip(np.asarray(latent, np.float64), 0, None)
    total = positive.sum(axis=1, keepdims=True)
    return np.sqrt(np.divide(positive, total, out=np.zeros_like(positive), where=total > 0)).astype(np.float32)


@dataclass
class _Fit:
    """What a window is compared with: a (pseudo-)reference's mean, spread, whitening and neighbours."""

    mean: np.ndarray
    sd: np.ndarray
    precision: np.ndarray
    neighbours: NearestNeighbors
    novel_distance: float
    size: int

    @classmethod
    def of(cls, features: np.ndarray, groups: np.ndarray, k: int) -> "_Fit":
        covariance = LedoitWolf().fit(features)
        neighbours = NearestNeighbors(n_neighbors=k).fit(features)
        return cls(features.mean(axis=0), features.std(axis=0) + 1e-9, covariance.precision_, neighbours,
                   float(np.quantile(_leave_group_out_distance(neighbours, features, groups, k), NOVEL_QUANTILE)), len(features))

    def statistics(self, window: np.ndarray) -> dict[str, float]:
        n = len(window)
        difference = window.mean(axis=0) - self.mean
        scale = 1.0 / n + 1.0 / self.size  # the variance of a difference of two means, per unit of spread
        distance = self.neighbours.kneighbors(window)[0][:, -1]
        share = float((distance > self.novel_distance).mean())
        expected = 1.0 - NOVEL_QUANTILE
        return {"shift": float(difference @ self.precision @ difference / scale / len(difference)),
                "channel_shift": float(np.max(np.abs(difference) / self.sd) / math.sqrt(scale)),
                "novelty": (share - expected) / math.sqrt(expected * (1 - expected) / n)}

    def contributions(self, window: np.ndarray) -> np.ndarray:
        """Each window sample's share in the whitened shift: its projection on P(x̄ − μ), largest for the new group."""
        direction = self.precision @ (window.mean(axis=0) - self.mean)
        return (window - self.mean) @ direction


def _leave_group_out_distance(neighbours: NearestNeighbors, features: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """Distance of each reference sample to its k-th nearest reference sample of another group (its own photo's other
    views would make every trusted sample look typical)."""
    largest = int(np.bincount(np.unique(groups, return_inverse=True)[1]).max())
    wanted = min(len(features), k + largest)
    distances, index = neighbours.kneighbors(features, n_neighbors=wanted)
    other = groups[index] != groups[:, None]
    out = np.empty(len(features))
    for row in range(len(features)):
        found = distances[row][other[row]]
        out[row] = found[k - 1] if len(found) >= k else distances[row, -1]
    return out


@dataclass
class CrossClassDrift(Verdict):
    """One window, all classes together (see :class:`Verdict`), and which rows carry the shift."""

    rows: np.ndarray = field(repr=False)  # window rows tested (with a descriptor, not flagged by the known detector)
    contributions: np.ndarray | None = field(default=None, repr=False)  # per tested row, see _Fit.contributions
    distances: np.ndarray | None = field(default=None, repr=False)  # per tested row, to its k-th nearest reference sample

    def summary(self) -> dict:
        if self.skipped:
            return {"n": len(self.rows), "skipped": self.skipped}
        return {"n": len(self.rows), "statistics": self.statistics, "z": self.z, "drift_score": self.drift_score,
                "threshold": self.threshold, "alert": self.alert}

    def leading(self, count: int) -> np.ndarray:
        """Positions (in :attr:`rows`) of the samples that move the window most in the direction it drifted: the new
        group's prototypes first."""
        return np.argsort(self.contributions)[::-1][:count]


class CrossClassDetector(BaseEstimator):
    """Calibrated drift of class-comparable explanations against a reference, all classes together (scikit-learn style).

    Parameters
    ----------
    false_alarm_rate : probability that a window drawn like the reference raises this alert.
    n_resamples : random splits of the reference into a pseudo-reference and a pseudo-window (calibration).
    n_neighbors : k of the novelty distance.
    random_state : seeds the splits.

    ``fit(features, groups)`` takes the reference's descriptors (:func:`describe`) and one group id per row (rows of one
    trusted photo share it); ``null_`` then holds the calibration (persist with :meth:`calibration_to_dict`).
    """

    def __init__(self, false_alarm_rate=0.001, n_resamples=100, n_neighbors=5, random_state=0):
        self.false_alarm_rate = false_alarm_rate
        self.n_resamples = n_resamples
        self.n_neighbors = n_neighbors
        self.random_state = random_state

    def fit(self, features: np.ndarray, groups: np.ndarray, calibration: dict | None = None, key: str = ""):
        features, groups = np.asarray(features, np.float64), np.asarray(groups)
        distinct = len(np.unique(groups))
        if len(features) < MIN_REFERENCE or distinct < 4:
            raise InputError("reference", f"has {len(features)} samples from {distinct} trusted photos with relevance at the monitor "
                             f"layer; the cross-class test needs at least {MIN_REFERENCE} from 4", "build it from more trusted photos")
        self.features_, self.groups_, self.key_ = features, groups, key
        self.fit_ = _Fit.of(features, groups, self.n_neighbors)
        self.null_ = None
        if calibration and calibration.get("key") == self.calibration_key():
            self.null_ = NullModel.from_dict(calibration["null"])
        return self

    def calibration_key(self) -> str:
        return f"{self.key_}:{sorted(self.get_params().items())}"

    def calibration_to_dict(self) -> dict:
        return {"key": self.calibration_key(), "null": self.null_.to_dict()}

    def calibrate(self) -> NullModel:
        """Resample the null model now (once; kept in ``null_``)."""
        if self.null_ is not None:
            return self.null_
        rng = np.random.default_rng(self.random_state)
        names = np.unique(self.groups_)
        values = {k: [] for k in EVIDENCE}
        for _ in range(self.n_resamples):
            held = np.isin(self.groups_, rng.choice(names, size=len(names) // 2, replace=False))
            fit = _Fit.of(self.features_[~held], self.groups_[~held], self.n_neighbors)
            for k, v in fit.statistics(self.features_[held]).items():
                values[k].append(v)
        table = {k: np.asarray(v) for k, v in values.items()}
        location = {k: float(np.median(v)) for k, v in table.items()}
        # every statistic is in units of its own noise (per degree of freedom, or a z-score): a spread below MIN_SCALE
        # means the draws could not vary (novelty's share in a small pseudo-window), not that traffic cannot
        scale = {k: max(MAD_TO_SIGMA * float(np.median(np.abs(v - location[k]))), MIN_SCALE) for k, v in table.items()}
        drift = np.max([(table[k] - location[k]) / scale[k] for k in EVIDENCE], axis=0)
        self.null_ = NullModel(int(held.sum()), location, scale, tail_threshold(drift, self.false_alarm_rate), self.n_resamples)
        return self.null_

    def analyse(self, features: np.ndarray, rows: np.ndarray) -> CrossClassDrift:
        """The window's tested ``rows`` with their descriptors ``features``: evidence and verdict.

        A request repeated verbatim (a client retrying, a cached image polled) counts once: n identical copies would
        pass for n independent samples and shrink the noise the statistics divide by."""
        features = np.asarray(features, np.float64)
        _, first = np.unique(features.round(6), axis=0, return_index=True)
        first = np.sort(first)
        features, rows = features[first], np.asarray(rows)[first]
        result = CrossClassDrift(np.asarray(rows))
        if len(rows) < MIN_WINDOW:
            result.skipped = f"{len(rows)} samples with relevance at the monitor layer; at least {MIN_WINDOW} are needed"
            return result
        result.judge(self.fit_.statistics(features), self.calibrate())
        result.contributions = self.fit_.contributions(features)
        result.distances = self.fit_.neighbours.kneighbors(features)[0][:, -1]
        return result

