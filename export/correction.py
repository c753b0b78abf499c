"""The correction to bake into a graph: P-ClArC's directions V (k of them), clean reference z, mode and optional detector.

Plain arrays, so the same object drives the ONNX surgery, the PyTorch reference it is verified against
(:class:`unhans.core.clarc.PClArC`) and the spec file that ships beside the graph in a TorchServe archive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.cav import CAV, CAV_MODES, features, fingerprint
from ..core.clarc import PClArC
from ..core.errors import InputError


@dataclass(frozen=True, eq=False)
class Correction:
    """h' = h − g·V Vᵀ(h − z) after one layer; g = 1, or the detector's gate (score > threshold) when reactive.

    ``direction`` holds V's orthonormal columns as rows, (k, D) (a single unit v (D,) is taken as k = 1): D entries
    on the flattened activation in ``flat`` mode, C per position in ``channel`` mode. ``clean_mean`` is z, shaped
    like one sample's activation. ``detector_weight`` / ``detector_bias`` score f(h) (flattened, or averaged per
    channel); a graph built with a detector reports that score as its ``artifact_score`` output, and gates the
    projection with it when ``reactive``.
    """

    direction: np.ndarray
    clean_mean: np.ndarray
    mode: str = "flat"
    detector_weight: np.ndarray | None = None
    detector_bias: float = 0.0
    threshold: float = 0.0
    reactive: bool = False

    def __post_init__(self):
        # own copies: the correction must not change when the caller's arrays do
        v = np.array(self.direction, np.float32)
        v = v if v.ndim == 2 else v.reshape(1, -1)  # one direction, however shaped, is k = 1
        object.__setattr__(self, "direction", v)
        object.__setattr__(self, "clean_mean", np.array(self.clean_mean, np.float32))
        if self.detector_weight is not None:
            object.__setattr__(self, "detector_weight", np.array(self.detector_weight, np.float64).ravel())
        if self.mode not in CAV_MODES:
            raise InputError("mode", f"{self.mode!r} is unknown", f"use one of {CAV_MODES}")
        if not (np.isfinite(v).all() and np.isfinite(self.clean_mean).all()):
            raise InputError("correction", "v or z holds NaN or Inf", "refit the CAV on finite activations")
        gram = v.astype(np.float64) @ v.T.astype(np.float64)
        if len(v) > v.shape[1] or np.abs(gram - np.eye(len(v))).max() > 1e-4:
            what = f"v has norm {np.linalg.norm(v):.4g}, P-ClArC needs a unit vector" if len(v) == 1 else \
                f"the {len(v)} directions are not orthonormal (|VᵀV − I| up to {np.abs(gram - np.eye(len(v))).max():.3g})"
            raise InputError("correction", what, "divide v by its norm" if len(v) == 1 else "orthonormalise them (np.linalg.qr)")
        if self.reactive and self.detector_weight is None:
            raise InputError("reactive", "a reactive correction needs a detector", "pass the CAV's detector weight and bias")
        if self.detector_weight is not None and self.detector_weight.shape != v.shape[1:]:
            raise InputError("correction", f"detector has {self.detector_weight.size} weights but v has {v.shape[1]}", "take both from one CAV")

    @classmethod
    def from_cav(cls, cav: CAV, reactive: bool = False, threshold: float = 0.0, detector: bool = True) -> "Correction":
        """The correction of a fitted CAV; ``detector=False`` drops the score output (only possible when not reactive)."""
        weight = cav.detector_weight_ if detector or reactive else None
        return cls(cav.directions_, cav.clean_mean_, cav.mode, weight, cav.detector_bias_, threshold, reactive)

    @property
    def directions(self) -> int:
        """k, the rank of the projection."""
        return len(self.direction)

    @property
    def has_detector(self) -> bool:
        return self.detector_weight is not None

    def check_shape(self, shape: tuple[int, ...], where: str) -> None:
        """Refuse a correction that does not fit activations of ``shape`` (one sample, no batch axis)."""
        shape = tuple(int(s) for s in shape)
        size = self.direction.shape[1]
        expected = int(np.prod(shape)) if self.mode == "flat" else (shape[0] if len(shape) >= 2 else None)
        if expected is None:
            raise InputError("mode", f"'channel' needs activations (C, H, W) at {where}, it has shape {shape}", "use mode 'flat'")
        if size != expected or tuple(self.clean_mean.shape) != shape:
            raise InputError(
                "correction", f"v has {size} entries and z shape {tuple(self.clean_mean.shape)}, but {where} has activations {shape} "
                f"(needs {expected} entries in {self.mode} mode)", "fit the CAV on the layer the correction goes after")

    def module(self) -> PClArC:
        """The PyTorch P-ClArC module of this correction: the reference every exported graph is checked against."""
        detector = dict(detector_weight=self.detector_weight, detector_bias=self.detector_bias, threshold=self.threshold) if self.reactive else {}
        return PClArC(self.direction, self.clean_mean, self.mode, **detector)

    def score(self, h: np.ndarray) -> np.ndarray:
        """Detector score w·f(h) + b per sample (NaN rows when there is no detector)."""
        if not self.has_detector:
            return np.full(len(h), np.nan)
        return features(h, self.mode) @ self.detector_weight + self.detector_bias

    def fingerprint(self) -> str:
        """The same hash as :meth:`CAV.fingerprint` for the same V, z and detector, so files can be matched to CAVs."""
        return fingerprint(self.direction, self.clean_mean, self.detector_weight if self.has_detector else np.zeros(0), self.detector_bias)

    def save(self, target, layer: str) -> None:
        """Write the spec (arrays + a JSON header naming the layer) that the PyTorch twin in an archive is rebuilt from.

        ``target``: a path or a binary file object.
        """
        header = {"layer": layer, "mode": self.mode, "directions": self.directions, "reactive": self.reactive, "threshold": self.threshold,
                  "detector_bias": self.detector_bias, "fingerprint": self.fingerprint()}
        arrays = {"direction": self.direction, "clean_mean": self.clean_mean}
        if self.has_detector:
            arrays["detector_weight"] = self.detector_weight
        np.savez(target, header=np.array(json.dumps(header)), **arrays)


def load_correction(path: str | Path) -> tuple[Correction, str]:
    """A spec written by :meth:`Correction.save`: the correction and the layer it goes after."""
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            correction = Correction(z["direction"], z["clean_mean"], header["mode"],
                                    z["detector_weight"] if "detector_weight" in z else None,
                                    header["detector_bias"], header["threshold"], header["reactive"])
    except (OSError, KeyError, ValueError) as error:
        raise InputError(str(path), f"is not a correction spec ({error})", "pass the .correction.npz written by 'unhans export'") from None
    if correction.fingerprint() != header["fingerprint"]:
        raise InputError(str(path), "its arrays do not match the fingerprint it records", "export again; the file was altered")
    return correction, header["layer"]
