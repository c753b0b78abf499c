"""Is a class of served traffic explained by a strategy its trusted reference never showed?

Per window and predicted class, four pieces of evidence, each oriented so that larger means "more drift":

* ``eigengap`` and ``fisher_tau`` (log1p of τ, capped): SpRAy on the window's maps. A new strategy is a new, well
  separated group of explanations: the kNN graph nearly falls apart (a large gap after the first eigenvalues)
  and the 2-way split separates cleanly.
* ``concentration``: the most concentrated cluster's share of mean relevance on its top 2% of pixels. An
  artifact is small and in the same place in every member of its cluster; objects spread out.
* ``distance``: n·‖mean(window) − mean(reference)‖² / tr(Σ_reference): how far the window's mean map moved, in
  units of the reference's own spread (about 1 for a window drawn like the reference, whatever its size).

None has a known null distribution, and each depends on how many samples a class has in the window, so each is
calibrated by resampling: windows of the same size (to a geometric size bucket) are drawn without replacement from
the class's reference samples, and each statistic is turned into a robust z-score against those draws (widened by
the finite population correction: draws from a small pool vary less than new traffic does). A class's
``drift_score`` is its largest z-score; it alerts above a threshold set, from the resampled windows' own drift
scores, to the stated false-alarm rate per window (split evenly over the classes), with the tail beyond the draws
extrapolated as exponential (peaks over threshold).

The artifact detector's share (scores above 0: the CAV's detector says the known artifact is there) is reported and
alerts on its own, as a binomial excess over the reference's share. It is not part of the drift score: the known
artifact is the one the correction already removes, so its presence in traffic is a warning, not a new
Clever-Hans strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm
from sklearn.base import BaseEstimator

from unhans.audit.clusters import concentration
from unhans.core.errors import InputError
from unhans.core.spray import SpRAy, _thread_limit

from .reference import Reference

EVIDENCE = ("eigengap", "fisher_tau", "concentration", "distance")
TAU_CAP = 1e6  # τ is inf for a class that falls into two components; log1p(1e6) ≈ 13.8 keeps z-scores finite
MAD_TO_SIGMA = 1.4826
TAIL_SHARE = 0.2  # the top 20% of resampled drift scores model the tail beyond them
MIN_THRESHOLD = 4.0  # never alert below 4 robust sigmas, however tight the resampled draws were


@dataclass
class NullModel:
    """Resampled windows of one class at one size: robust location and scale of each statistic, and the threshold."""

    size: int
    location: dict[str, float]
    scale: dict[str, float]
    threshold: float
    draws: int

    def z(self, statistics: dict[str, float]) -> dict[str, float]:
        return {k: (statistics[k] - self.location[k]) / self.scale[k] for k in self.location}

    def to_dict(self) -> dict:
        return {"size": self.size, "location": self.location, "scale": self.scale, "threshold": self.threshold, "draws": self.draws}

    @classmethod
    def from_dict(cls, data: dict) -> "NullModel":
        return cls(int(data["size"]), dict(data["location"]), dict(data["scale"]), float(data["threshold"]), int(data["draws"]))


@dataclass(kw_only=True)
class Verdict:
    """One test in one window: its evidence, their z-scores against the calibration, the verdict, or why it was skipped."""

    skipped: str | None = None
    statistics: dict[str, float] = field(default_factory=dict)
    z: dict[str, float] = field(default_factory=dict)
    drift_score: float | None = None
    threshold: float | None = None
    alert: bool = False

    def judge(self, statistics: dict[str, float], null: NullModel) -> None:
        """The drift score is the largest z-score; it alerts above the calibrated threshold."""
        self.statistics, self.z = statistics, null.z(statistics)
        self.drift_score, self.threshold = max(self.z.values()), null.threshold
        self.alert = self.drift_score > null.threshold


@dataclass
class ClassDrift(Verdict):
    """One class in one window (see :class:`Verdict`), with the artifact detector's share."""

    class_index: int
    rows: np.ndarray = field(repr=False)  # window rows predicted as this class
    analysed: np.ndarray | None = field(default=None, repr=False)  # the rows SpRAy ran on (a subsample of a large class)
    artifact_share: float | None = None
    artifact_share_reference: float | None = None
    artifact_alert: bool = False
    spray: SpRAy | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.rows)

    def summary(self) -> dict:
        base = {"class_index": self.class_index, "n": self.n, "artifact_share": self.artifact_share,
                "artifact_share_reference": self.artifact_share_reference, "artifact_alert": self.artifact_alert}
        if self.skipped:
            return {**base, "skipped": self.skipped}
        return {**base, "n_analysed": len(self.analysed), "statistics": self.statistics, "z": self.z, "drift_score": self.drift_score,
                "threshold": self.threshold, "alert": self.alert, "n_clusters": self.spray.n_clusters_,
                "cluster_sizes": np.bincount(self.spray.labels_).tolist()}


def _statistics(spray: SpRAy, features: np.ndarray, reference_mean: np.ndarray, reference_spread: float,
                min_cluster: int, pooled_shape: tuple[int, int]) -> dict[str, float]:
    """The four pieces of evidence of one fitted window (see the module docstring)."""
    maps = features.reshape(len(features), 1, *pooled_shape)
    sizes = np.bincount(spray.labels_)
    concentrations = [concentration(maps[spray.labels_ == c]) for c in range(len(sizes)) if sizes[c] >= min_cluster]
    difference = features.mean(axis=0) - reference_mean
    return {
        "eigengap": float(spray.eigengap_),
        "fisher_tau": math.log1p(min(float(spray.fisher_tau_), TAU_CAP)),
        "concentration": max(concentrations) if concentrations else concentration(maps),
        "distance": float(len(features) * (difference @ difference) / reference_spread),
    }


def tail_threshold(drift_scores: np.ndarray, alpha: float) -> float:
    """The drift score exceeded with probability ``alpha`` under the null: exponential tail over the top draws."""
    scores = np.sort(drift_scores)
    if alpha * len(scores) >= 5:  # enough draws to read the quantile directly
        return max(float(np.quantile(scores, 1 - alpha)), MIN_THRESHOLD)
    start = int(len(scores) * (1 - TAIL_SHARE))
    base = scores[start - 1]
    excess = scores[start:] - base
    beta = max(float(excess.mean()), 1e-6)  # exponential mean excess; a heavier tail than the draws show is not modelled
    return max(float(base + beta * math.log(TAIL_SHARE / alpha)), MIN_THRESHOLD)


def known_artifact_share(scores: np.ndarray, reference_scores: np.ndarray, alpha: float) -> tuple[float, float, bool]:
    """Share of a window's samples the known artifact's detector flags, the reference's share, and whether the window's
    exceeds it beyond chance (one-sided binomial z at ``alpha``, at least 3 flagged)."""
    flagged = np.isfinite(scores) & (scores > 0)
    share = float(flagged.mean()) if len(scores) else 0.0
    base = float((reference_scores > 0).mean()) if len(reference_scores) else 0.0
    p0 = min(max(base, 0.5 / max(len(reference_scores), 1)), 1 - 1e-9)  # a reference with no flagged sample still has a rate
    z = (share - p0) / math.sqrt(p0 * (1 - p0) / max(len(scores), 1))
    return share, base, bool(z > norm.isf(alpha) and flagged.sum() >= 3)


class DriftDetector(BaseEstimator):
    """Calibrated per-class drift of explanations against a :class:`Reference` (scikit-learn style).

    Parameters
    ----------
    false_alarm_rate : probability that a window drawn like the reference raises any new-strategy alert (all
        classes together); each class gets an equal share of it. Also the rate of the known-artifact alert.
    n_resamples : resampled reference windows per class and size bucket.
    n_neighbors : SpRAy's kNN graph.
    min_samples : fewest samples of a class in a window worth analysing; fewer are skipped and counted.
    max_class_samples : a class with more samples in a window is analysed on a random subsample of this many
        (and never more than ``max_reference_share`` of its reference samples, so resampled windows differ).
    size_ratio : width of a size bucket; windows within it share one calibration.
    min_cluster : clusters smaller than this do not count for ``concentration`` (two maps always look concentrated).
    random_state : seeds resampling and SpRAy.

    Attributes
    ----------
    reference_ : the reference, ``reference_fingerprint_`` its fingerprint; ``null_`` : {(class, bucket size): NullModel}, filled as sizes are met (persist
    them with :meth:`calibration_to_dict`). ``reference_mean_`` / ``reference_spread_`` per class.
    """

    def __init__(self, false_alarm_rate=0.001, n_resamples=100, n_neighbors=10, min_samples=30, max_class_samples=500,
                 max_reference_share=0.6, size_ratio=1.25, min_cluster=5, random_state=0):
        self.false_alarm_rate = false_alarm_rate
        self.n_resamples = n_resamples
        self.n_neighbors = n_neighbors
        self.min_samples = min_samples
        self.max_class_samples = max_class_samples
        self.max_reference_share = max_reference_share
        self.size_ratio = size_ratio
        self.min_cluster = min_cluster
        self.random_state = random_state

    def fit(self, reference: Reference, calibration: dict | None = None):
        """Take the reference; reuse a persisted calibration made with the same reference and parameters."""
        if not 0 < self.false_alarm_rate < 1:
            raise InputError("false_alarm_rate", f"is {self.false_alarm_rate}", "use a probability such as 0.001")
        if self.min_samples <= self.n_neighbors:
            raise InputError("min_samples", f"is {self.min_samples}", f"use more than n_neighbors ({self.n_neighbors})")
        self.reference_ = reference
        self.reference_fingerprint_ = reference.fingerprint()  # hashes every map: once, not per window
        self.pooled_shape_ = tuple(-(-s // reference.pooling) for s in reference.map_shape)
        self.reference_mean_, self.reference_spread_ = {}, {}
        for c in range(len(reference.classes)):
            pool = reference.features[reference.pool(c)]
            if len(pool):
                self.reference_mean_[c] = pool.mean(axis=0)
                self.reference_spread_[c] = max(float(pool.var(axis=0).sum()), 1e-12)
        self.null_ = {}
        if calibration and calibration.get("key") == self.calibration_key():
            self.null_ = {(int(c), int(s)): NullModel.from_dict(m) for c, s, m in calibration["null"]}
        return self

    def calibration_key(self) -> str:
        """What a calibration depends on: the reference and every parameter."""
        return f"{self.reference_fingerprint_}:{sorted(self.get_params().items())}"

    def calibration_to_dict(self) -> dict:
        return {"key": self.calibration_key(), "null": [[c, s, m.to_dict()] for (c, s), m in sorted(self.null_.items())]}

    @property
    def class_alpha(self) -> float:
        return self.false_alarm_rate / len(self.reference_.classes)

    def capacity(self, class_index: int) -> int:
        """The most samples of a class a window is analysed on."""
        return min(self.max_class_samples, int(self.max_reference_share * len(self.reference_.pool(class_index))))

    def testable(self, class_index: int) -> bool:
        """Whether the reference holds enough samples of a class to test it at all."""
        return self.capacity(class_index) >= self.min_samples

    def bucket(self, n: int) -> int:
        """The calibrated size standing in for ``n`` samples: the geometric middle of n's bucket."""
        index = math.floor(math.log(n) / math.log(self.size_ratio))
        return int(round(self.size_ratio ** (index + 0.5)))

    def _spray(self) -> SpRAy:
        return SpRAy(n_neighbors=self.n_neighbors, pooling=1, normalization=None, random_state=self.random_state)

    def _measure(self, class_index: int, features: np.ndarray, reference_mean: np.ndarray) -> tuple[SpRAy, dict]:
        spray = self._spray()._fit(features)
        return spray, _statistics(spray, features, reference_mean, self.reference_spread_[class_index], self.min_cluster, self.pooled_shape_)

    def null_model(self, class_index: int, size: int) -> NullModel:
        """The calibration of ``class_index`` at bucket size ``size``, resampled now if not yet known."""
        key = (class_index, size)
        if key not in self.null_:
            pool = self.reference_.features[self.reference_.pool(class_index)]
            rng = np.random.default_rng([self.random_state, class_index, size])
            values = {k: [] for k in EVIDENCE}
            with _thread_limit(1):
                for _ in range(self.n_resamples):
                    drawn = rng.choice(len(pool), size=size, replace=False)
                    held_out = np.ones(len(pool), bool)
                    held_out[drawn] = False  # the window is compared with the reference it was not drawn from
                    _, statistics = self._measure(class_index, pool[drawn], pool[held_out].mean(axis=0))
                    for k in EVIDENCE:
                        values[k].append(statistics[k])
            table = {k: np.asarray(v) for k, v in values.items()}
            location = {k: float(np.median(v)) for k, v in table.items()}
            spread = {k: max(MAD_TO_SIGMA * float(np.median(np.abs(v - location[k]))), 0.05 * abs(location[k]), 1e-6)
                      for k, v in table.items()}
            drift = np.max([(table[k] - location[k]) / spread[k] for k in EVIDENCE], axis=0)
            # Windows drawn without replacement from a pool of N vary less than windows of new traffic, by the finite
            # population correction sqrt(1 - n/N); the tail's shape comes from the draws, its width from the population.
            # ``distance`` needs no correction: its draws are compared with the held-out rest of the pool.
            widen = 1.0 / math.sqrt(1.0 - size / len(pool))
            scale = {k: spread[k] * (1.0 if k == "distance" else widen) for k in EVIDENCE}
            self.null_[key] = NullModel(size, location, scale, tail_threshold(drift, self.class_alpha), self.n_resamples)
        return self.null_[key]

    def analyse(self, relevance_features: np.ndarray, predictions: np.ndarray, scores: np.ndarray | None = None,
                seed: int = 0, fresh: np.ndarray | None = None) -> list[ClassDrift]:
        """Per class of a window (``relevance_features`` preprocessed like the reference): evidence and verdicts.

        ``fresh`` marks the rows new in this window; the others were carried from earlier windows
        (:mod:`unhans.monitor.carry`): they join their class's test, but the known artifact's share, a per-window
        figure, counts only fresh rows."""
        predictions = np.asarray(predictions).ravel()
        fresh = np.ones(len(predictions), bool) if fresh is None else np.asarray(fresh, bool)
        results = []
        for c in range(len(self.reference_.classes)):
            rows = np.flatnonzero(predictions == c)
            result = ClassDrift(c, rows)
            if scores is not None and fresh[rows].any():
                self._artifact_share(result, np.asarray(scores)[rows[fresh[rows]]])
            results.append(result)
            capacity = self.capacity(c)
            if len(rows) == 0:
                result.skipped = "no samples"
                continue
            if len(rows) < self.min_samples:
                result.skipped = f"{len(rows)} samples; at least {self.min_samples} are needed"
                continue
            if not self.testable(c):
                result.skipped = f"the reference has too few samples of this class ({len(self.reference_.pool(c))})"
                continue
            rng = np.random.default_rng([self.random_state, seed, c])
            result.analysed = np.sort(rng.choice(rows, size=capacity, replace=False)) if len(rows) > capacity else rows
            null = self.null_model(c, min(self.bucket(len(result.analysed)), capacity))
            with _thread_limit(1):
                result.spray, statistics = self._measure(c, relevance_features[result.analysed], self.reference_mean_[c])
            result.judge(statistics, null)
        return results

    def _artifact_share(self, result: ClassDrift, scores: np.ndarray) -> None:
        """Share of the class's window samples the artifact detector flags, and whether it exceeds the reference's."""
        if self.reference_.scores is None:
            result.artifact_share = float((np.isfinite(scores) & (scores > 0)).mean())
            return
        pool = self.reference_.scores[self.reference_.pool(result.class_index)]
        result.artifact_share, result.artifact_share_reference, result.artifact_alert = known_artifact_share(scores, pool, self.class_alpha)
