"""Concept activation vectors: the direction of an artifact in a layer's activations, and a detector for it.

Two directions (NOTES.md §1): the *pattern* CAV, the normalised difference of the class means (it follows the true
concept direction better), and the *filter* CAV, the weight vector of a linear classifier. The detector is always a
linear classifier that keeps its intercept, so ``decision_function(h) > 0`` means "carries the artifact".

Modes: ``flat`` works on the flattened activation (C·H·W; suits fixed-position artifacts), ``channel`` on the
channel vector (C) at every position (suits artifacts that move). In ``channel`` mode the direction is fitted on
spatially averaged activations and the detector on the same.

The contrast set is the caller's explicit choice: clean samples of all classes (the default that worked), or the
same images without the artifact (:meth:`CAV.fit_paired`), which worked best where the artifact can be pasted.
"""

from __future__ import annotations

import hashlib

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from .errors import InputError

CAV_METHODS = ("pattern", "svm", "logistic")
CAV_MODES = ("flat", "channel")
QUALITY_FOLDS = 5  # cross-validation folds of the held-out detection accuracy (fewer when samples are few)
POOR_DETECTION = 0.9  # held-out detection accuracy below this is reported as a warning
FEW_SAMPLES = 0.1  # fewer samples than this share of the CAV's dimensions is reported as a warning


def features(h: np.ndarray, mode: str) -> np.ndarray:
    """Activations (N, C, H, W) or (N, D) as the vectors a CAV lives in: flattened, or averaged per channel."""
    h = np.asarray(h, dtype=np.float64)
    if mode == "channel":
        if h.ndim != 4:
            raise InputError("mode", f"'channel' needs activations (N, C, H, W), got shape {h.shape}", "use mode='flat' for dense layers")
        return h.mean(axis=(2, 3))
    return h.reshape(len(h), -1)


def fingerprint(direction, clean_mean, detector_weight, detector_bias: float) -> str:
    """A short hash of what a correction depends on, so deployed files can be matched to the CAV they carry."""
    digest = hashlib.sha256()
    for array in (np.float32(direction), np.float32(clean_mean), np.float64(detector_weight), np.float64([detector_bias])):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


class CAV(BaseEstimator):
    """Fit ``direction_`` (unit v), ``clean_mean_`` (z, shaped like one sample's activation) and a detector.

    Learned attributes: ``direction_`` (D,) or (C,), ``clean_mean_`` (activation shape), ``detector_weight_``,
    ``detector_bias_`` (the detector's intercept, in activation units), ``activation_shape_``, ``artifact_mean_score_``,
    ``quality_`` (held-out detection accuracy, sample and dimension counts, and warnings: see :meth:`_quality`).
    """

    def __init__(self, method: str = "pattern", mode: str = "flat", C: float = 1.0, random_state: int = 0):
        self.method = method
        self.mode = mode
        self.C = C
        self.random_state = random_state

    def _check(self, h_artifact, h_clean):
        if self.method not in CAV_METHODS:
            raise InputError("method", f"{self.method!r} is unknown", f"use one of {CAV_METHODS}")
        if self.mode not in CAV_MODES:
            raise InputError("mode", f"{self.mode!r} is unknown", f"use one of {CAV_MODES}")
        if len(h_artifact) < 2 or len(h_clean) < 2:
            raise InputError("samples", f"{len(h_artifact)} artifact and {len(h_clean)} clean samples", "give at least 2 of each")
        if h_artifact.shape[1:] != h_clean.shape[1:]:
            raise InputError("activations", f"artifact {h_artifact.shape[1:]} and clean {h_clean.shape[1:]} differ", "take both from the same layer")
        for name, h in (("artifact", h_artifact), ("clean", h_clean)):
            if not np.isfinite(h).all():
                raise InputError(f"{name} activations", "contain NaN or Inf", "check the model and the inputs")

    def _fit_detector(self, a: np.ndarray, c: np.ndarray) -> None:
        self.detector_weight_, self.detector_bias_ = self._detector(a, c)

    def _detector(self, a: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, float]:
        """A linear classifier on standardised features, mapped back so that score = w·h + b in activation units."""
        x = np.concatenate([a, c])
        y = np.r_[np.ones(len(a)), np.zeros(len(c))]
        scaler = StandardScaler().fit(x)
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        if self.method == "svm":
            classifier = LinearSVC(C=self.C, random_state=self.random_state, max_iter=5000)
        else:
            classifier = LogisticRegression(C=self.C, max_iter=2000)
        classifier.fit((x - scaler.mean_) / scale, y)
        weight = classifier.coef_.ravel() / scale
        return weight, float(classifier.intercept_[0] - weight @ scaler.mean_)

    def _quality(self, a: np.ndarray, c: np.ndarray, paired: bool) -> dict:
        """Cross-validated accuracy of the detector on samples it was not fitted on (a pair stays in one fold), and
        warnings a person should read before deploying the correction."""
        x, y = np.concatenate([a, c]), np.r_[np.ones(len(a)), np.zeros(len(c))]
        folds = min(QUALITY_FOLDS, len(a), len(c))
        quality = {"samples": int(len(x)), "dims": int(x.shape[1]), "folds": int(folds), "paired": paired}
        warnings = []
        if folds >= 2:
            if paired:
                groups = np.r_[np.arange(len(a)), np.arange(len(c))]
                splits = GroupKFold(n_splits=folds).split(x, y, groups)
            else:
                splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.random_state).split(x, y)
            correct = 0
            for train, held in splits:
                weight, bias = self._detector(x[train][y[train] == 1], x[train][y[train] == 0])
                correct += int(((x[held] @ weight + bias > 0) == (y[held] == 1)).sum())
            quality["heldout_detection_acc"] = correct / len(x)
            if quality["heldout_detection_acc"] < POOR_DETECTION:
                warnings.append(f"the detector finds the artifact in held-out samples only {quality['heldout_detection_acc']:.0%} "
                                "of the time: the samples may not share one artifact, or this layer does not represent it")
        else:
            quality["heldout_detection_acc"] = float("nan")
            warnings.append("too few samples to measure detection on held-out ones (need 2 of each)")
        if len(x) < FEW_SAMPLES * x.shape[1]:
            warnings.append(f"{len(x)} samples for {x.shape[1]} dimensions: the direction is poorly determined; "
                            "use more samples, a smaller layer, or mode='channel'")
        if not paired:
            warnings.append("artifact and clean samples are different images: the direction may carry what else tells them "
                            "apart; a paired set (the same images with the artifact pasted) is more reliable")
        quality["warnings"] = warnings
        return quality

    def fit(self, h_artifact: np.ndarray, h_clean: np.ndarray) -> "CAV":
        """Fit on activations of samples with the artifact and of the contrast (clean) samples."""
        h_artifact, h_clean = np.asarray(h_artifact), np.asarray(h_clean)
        self._check(h_artifact, h_clean)
        a, c = features(h_artifact, self.mode), features(h_clean, self.mode)
        self._fit_detector(a, c)
        self.quality_ = self._quality(a, c, paired=False)
        direction = a.mean(0) - c.mean(0) if self.method == "pattern" else self.detector_weight_.copy()
        return self._finish(direction, h_clean, a)

    def fit_paired(self, h_with: np.ndarray, h_without: np.ndarray) -> "CAV":
        """Fit on the same images with and without the artifact: v is the mean paired difference."""
        h_with, h_without = np.asarray(h_with), np.asarray(h_without)
        self._check(h_with, h_without)
        if len(h_with) != len(h_without):
            raise InputError("pairs", f"{len(h_with)} with and {len(h_without)} without the artifact", "pass the same images twice")
        a, c = features(h_with, self.mode), features(h_without, self.mode)
        self._fit_detector(a, c)
        self.quality_ = self._quality(a, c, paired=True)
        return self._finish((a - c).mean(0), h_without, a)

    def _finish(self, direction: np.ndarray, h_clean: np.ndarray, a: np.ndarray) -> "CAV":
        norm = np.linalg.norm(direction)
        if not norm > 0:
            raise InputError("samples", "artifact and clean activations have the same mean", "check that the artifact samples really carry it")
        self.direction_ = (direction / norm).astype(np.float32)
        self.clean_mean_ = h_clean.mean(0).astype(np.float32)
        self.activation_shape_ = tuple(h_clean.shape[1:])
        self.artifact_mean_score_ = float(np.mean(a @ self.detector_weight_ + self.detector_bias_))
        return self

    def decision_function(self, h: np.ndarray) -> np.ndarray:
        """Detector score per sample: > 0 means the artifact is present (the intercept is kept)."""
        h = np.asarray(h)
        if tuple(h.shape[1:]) != self.activation_shape_:
            raise InputError("activations", f"shape {h.shape[1:]} does not match the CAV's {self.activation_shape_}", "take them from the layer the CAV was fitted on")
        return features(h, self.mode) @ self.detector_weight_ + self.detector_bias_

    def fingerprint(self) -> str:
        return fingerprint(self.direction_, self.clean_mean_, self.detector_weight_, self.detector_bias_)
