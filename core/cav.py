"""Concept activation vectors: the direction of an artifact in a layer's activations, and a detector for it.

Two directions (NOTES.md §1): the *pattern* CAV, the normalised difference of the class means (it follows the true
concept direction better), and the *filter* CAV, the weight vector of a linear classifier. The detector is always a
linear classifier that keeps its intercept, so ``decision_function(h) > 0`` means "carries the artifact".

Modes: ``flat`` works on the flattened activation (C·H·W; suits fixed-position artifacts), ``channel`` on the
channel vector (C) at every position (suits artifacts that move). In ``channel`` mode the direction is fitted on
spatially averaged activations and the detector on the same.

The contrast set is the caller's explicit choice: clean samples of all classes (the default that worked), or the
same images without the artifact (:meth:`CAV.fit_paired`), which worked best where the artifact can be pasted.

Subspace (rank-k): one direction need not carry an artifact's whole effect (a watermark moves a real network's
activations along several). From pairs, ``n_directions`` > 1 keeps the method's direction first and adds the top
right singular vectors of the paired differences with it projected out (so k = 1 is exactly the single CAV);
``'auto'`` takes the smallest k whose subspace holds ``ENERGY_SHARE`` of the differences' energy, capped.
"""

from __future__ import annotations

import hashlib

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from .defaults import CAV_METHODS, ENERGY_SHARE, MAX_DIRECTIONS
from .errors import InputError

CAV_MODES = ("flat", "channel")
QUALITY_FOLDS = 5  # cross-validation folds of the held-out detection accuracy (fewer when samples are few)
POOR_DETECTION = 0.9  # held-out detection accuracy below this is reported as a warning
FEW_SAMPLES = 0.1  # fewer samples than this share of the CAV's dimensions is reported as a warning
POOR_SUBSPACE = 0.25  # directions 2..k gaining less than this share on held-out pairs of what they gain on their own: a warning


def features(h: np.ndarray, mode: str) -> np.ndarray:
    """Activations (N, C, H, W) or (N, D) as the vectors a CAV lives in: flattened, or averaged per channel."""
    h = np.asarray(h, dtype=np.float64)
    if mode == "channel":
        if h.ndim != 4:
            raise InputError("mode", f"'channel' needs activations (N, C, H, W), got shape {h.shape}", "use mode='flat' for dense layers")
        return h.mean(axis=(2, 3))
    return h.reshape(len(h), -1)


def fingerprint(direction, clean_mean, detector_weight, detector_bias: float) -> str:
    """A short hash of what a correction depends on, so deployed files can be matched to the CAV they carry.

    ``direction`` is v (D,) or V (k, D); k enters the hash when k > 1, so rank-1 files keep the hash they had."""
    digest = hashlib.sha256()
    k = len(direction) if np.ndim(direction) == 2 else 1
    if k > 1:
        digest.update(f"directions={k}".encode())
    for array in (np.float32(direction), np.float32(clean_mean), np.float64(detector_weight), np.float64([detector_bias])):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


class CAV(BaseEstimator):
    """Fit ``directions_`` (orthonormal rows V), ``clean_mean_`` (z, shaped like one sample's activation) and a detector.

    Learned attributes: ``directions_`` (k, D) or (k, C), ``direction_`` (its first row: the method's CAV),
    ``energy_share_`` (share of the paired differences' energy in the subspace; NaN unpaired), ``clean_mean_``
    (activation shape), ``detector_weight_``, ``detector_bias_`` (the detector's intercept, in activation units),
    ``activation_shape_``, ``artifact_mean_score_``, ``quality_`` (held-out detection accuracy, sample and dimension
    counts, and warnings: see :meth:`_quality`).

    ``n_directions``: k, an int, or ``'auto'`` (see the module doc); more than one needs pairs (:meth:`fit_paired`).
    """

    def __init__(self, method: str = "pattern", mode: str = "flat", C: float = 1.0, random_state: int = 0, n_directions: int | str = 1):
        self.method = method
        self.mode = mode
        self.C = C
        self.random_state = random_state
        self.n_directions = n_directions

    def _check(self, h_artifact, h_clean):
        if self.method not in CAV_METHODS:
            raise InputError("method", f"{self.method!r} is unknown", f"use one of {CAV_METHODS}")
        if self.mode not in CAV_MODES:
            raise InputError("mode", f"{self.mode!r} is unknown", f"use one of {CAV_MODES}")
        k = self.n_directions
        if not (k == "auto" or (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1)):
            raise InputError("n_directions", f"{k!r} is not a number of directions", "pass an integer >= 1 or 'auto'")
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

    def _quality(self, a: np.ndarray, c: np.ndarray, paired: bool, differences: np.ndarray | None = None,
                 groups: np.ndarray | None = None) -> dict:
        """Cross-validated accuracy of the detector on samples it was not fitted on (a pair, or a group of pairs made
        from one image, stays in one fold), and warnings a person should read before deploying the correction. Paired,
        also the share of held-out pairs' difference energy the subspace fitted without them holds: whether its
        directions generalise past the pairs they came from."""
        x, y = np.concatenate([a, c]), np.r_[np.ones(len(a)), np.zeros(len(c))]
        pair_groups = np.arange(len(a)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
        folds = min(QUALITY_FOLDS, len(a), len(c), int(pair_groups.max()) + 1 if paired else len(x))
        k = len(self.directions_)
        quality = {"samples": int(len(x)), "dims": int(x.shape[1]), "folds": int(folds), "paired": paired,
                   "directions": int(k), "energy_share": float(self.energy_share_)}
        warnings = []
        if folds >= 2:
            index = np.r_[np.arange(len(a)), np.arange(len(c))]  # the pair of every row of x
            if paired:
                splits = list(GroupKFold(n_splits=folds).split(x, y, pair_groups[index]))
            else:
                splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.random_state).split(x, y))
            correct, held = 0, np.zeros(3)  # energy held out: along the first direction, along all k, in all
            for train, test in splits:
                weight, bias = self._detector(x[train][y[train] == 1], x[train][y[train] == 0])
                correct += int(((x[test] @ weight + bias > 0) == (y[test] == 1)).sum())
                if paired:
                    pairs = np.unique(index[train])
                    rows = np.isin(self._pair_of, pairs)
                    v, _ = self._subspace(self._first(a[pairs], c[pairs], weight), differences[rows], k, len(pairs), strict=False)
                    projected = (differences[~rows] @ v.T) ** 2
                    held += [projected[:, 0].sum(), projected.sum(), (differences[~rows] ** 2).sum()]
            quality["heldout_detection_acc"] = correct / len(x)
            if paired and held[2] > 0:
                quality["heldout_energy_share"] = float(held[1] / held[2])
                fit_gain, held_gain = self.energy_share_ - self._first_share, (held[1] - held[0]) / held[2]
                if k > 1 and held_gain < POOR_SUBSPACE * fit_gain:
                    warnings.append(f"directions 2-{k} hold {fit_gain:.0%} more of the fitting pairs' difference energy but only "
                                    f"{held_gain:.0%} more of held-out pairs': they fit these pairs, not the artifact; "
                                    "use fewer directions or more pairs")
            if quality["heldout_detection_acc"] < POOR_DETECTION:
                warnings.append(f"the detector finds the artifact in held-out samples only {quality['heldout_detection_acc']:.0%} "
                                "of the time: the samples may not share one artifact, or this layer does not represent it")
        else:
            quality["heldout_detection_acc"] = float("nan")
            warnings.append("too few samples to measure detection on held-out ones (need 2 of each)")
        if len(x) < FEW_SAMPLES * x.shape[1]:
            warnings.append(f"{len(x)} samples for {x.shape[1]} dimensions: the direction is poorly determined; "
                            "use more samples (more images, or their crops and mirror images in a paired set), or a smaller layer")
        if not paired:
            warnings.append("artifact and clean samples are different images: the direction may carry what else tells them "
                            "apart; a paired set (the same images with the artifact pasted) is more reliable")
        quality["warnings"] = warnings
        return quality

    def fit(self, h_artifact: np.ndarray, h_clean: np.ndarray) -> "CAV":
        """Fit on activations of samples with the artifact and of the contrast (clean) samples (one direction: without
        pairs, differences between images would enter the subspace)."""
        h_artifact, h_clean = np.asarray(h_artifact), np.asarray(h_clean)
        self._check(h_artifact, h_clean)
        if self.n_directions != 1:
            raise InputError("n_directions", f"{self.n_directions!r} directions need paired samples",
                             "fit on the same images with and without the artifact (fit_paired, or --images), or use 1")
        a, c = features(h_artifact, self.mode), features(h_clean, self.mode)
        self._fit_detector(a, c)
        self.directions_, self.energy_share_ = self._unit(self._first(a, c, self.detector_weight_))[None], float("nan")
        self.quality_ = self._quality(a, c, paired=False)
        return self._finish(h_clean, a)

    def fit_paired(self, h_with: np.ndarray, h_without: np.ndarray, groups=None) -> "CAV":
        """Fit on the same images with and without the artifact: v is the mean paired difference (for the pattern
        method), further directions come from the differences themselves. ``groups`` (one label a pair) keeps pairs
        made from one image (its flips and crops) in one cross-validation fold, so the quality report is not flattered."""
        h_with, h_without = np.asarray(h_with), np.asarray(h_without)
        self._check(h_with, h_without)
        if len(h_with) != len(h_without):
            raise InputError("pairs", f"{len(h_with)} with and {len(h_without)} without the artifact", "pass the same images twice")
        a, c = features(h_with, self.mode), features(h_without, self.mode)
        self._fit_detector(a, c)
        differences = self._differences(h_with, h_without)
        pairs = len(a) if groups is None else len(np.unique(groups))
        if groups is not None and len(groups) != len(a):
            raise InputError("groups", f"{len(groups)} labels for {len(a)} pairs", "give one label a pair")
        first = self._first(a, c, self.detector_weight_)
        self._first_share = self._subspace(first, differences, 1, pairs)[1]
        self.directions_, self.energy_share_ = self._subspace(first, differences, self.n_directions, pairs)
        self.quality_ = self._quality(a, c, paired=True, differences=differences, groups=groups)
        return self._finish(h_without, a)

    def _first(self, a: np.ndarray, c: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
        """The method's direction: the mean difference (pattern), else the detector's weight (filter)."""
        if self.method == "pattern":
            return a.mean(0) - c.mean(0)
        return (self._detector(a, c)[0] if weight is None else weight).copy()

    def _differences(self, h_with: np.ndarray, h_without: np.ndarray) -> np.ndarray:
        """Paired differences in the space the projection acts on: flattened (flat), or the channel vector at every
        position (channel: the projection is applied per position). ``_pair_of`` names each row's pair."""
        d = np.asarray(h_with, np.float64) - np.asarray(h_without, np.float64)
        if self.mode == "channel":
            self._pair_of = np.repeat(np.arange(len(d)), int(np.prod(d.shape[2:])))
            return np.moveaxis(d, 1, -1).reshape(-1, d.shape[1])
        self._pair_of = np.arange(len(d))
        return d.reshape(len(d), -1)

    @staticmethod
    def _unit(direction: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(direction)
        if not norm > 0:
            raise InputError("samples", "artifact and clean activations have the same mean", "check that the artifact samples really carry it")
        return np.asarray(direction, np.float64) / norm

    @staticmethod
    def _subspace(first: np.ndarray, differences: np.ndarray, n_directions, pairs: int, strict: bool = True) -> tuple[np.ndarray, float]:
        """Orthonormal V (k, D): ``first`` normalised, then the top right singular vectors of the differences with it
        projected out (numpy's SVD); and the share of the differences' energy V holds. ``strict=False`` clips k to
        what the differences span instead of refusing (cross-validation folds hold fewer pairs)."""
        v1 = CAV._unit(first)
        total = float((differences ** 2).sum())
        along = differences @ v1
        alone = float((along ** 2).sum()) / total if total > 0 else float("nan")
        if n_directions == 1 or not total > 0:
            return v1[None], alone
        residual = differences - along[:, None] * v1
        _, s, vt = np.linalg.svd(residual, full_matrices=False)
        rank = int((s > s[0] * 1e-6).sum()) if s.size and s[0] > 0 else 0
        if n_directions == "auto":
            # at most half the pairs: a subspace as wide as the pairs fits each pair's own idiosyncrasies exactly
            cap = max(1, min(MAX_DIRECTIONS, rank + 1, pairs // 2))
            energy = alone + np.cumsum(s[:rank] ** 2) / total  # energy[j]: the share of 2 + j directions
            reached = np.flatnonzero(energy >= ENERGY_SHARE)
            k = 1 if alone >= ENERGY_SHARE else min(cap, 2 + int(reached[0]) if reached.size else cap)
        elif n_directions - 1 > rank:
            if strict:
                raise InputError("n_directions", f"{n_directions} directions, but the paired differences span only {rank + 1}",
                                 f"use at most {rank + 1}, or more pairs")
            k = rank + 1
        else:
            k = int(n_directions)
        v = np.concatenate([v1[None], vt[: k - 1]])
        return v, float(((differences @ v.T) ** 2).sum() / total)

    def _finish(self, h_clean: np.ndarray, a: np.ndarray) -> "CAV":
        self.directions_ = self.directions_.astype(np.float32)
        self.direction_ = self.directions_[0]
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
        return fingerprint(self.directions_, self.clean_mean_, self.detector_weight_, self.detector_bias_)
