"""The monitor's reference: how the served model explains trusted data, per predicted class.

Built once, before monitoring, by explaining a trusted dataset with the very model that serves (the archive's
explain graph or its zennit twin, through the handler's own :class:`~unhans.handlers.relevance.Explainer`), so a
window of served traffic and the reference differ only in the data, never in how relevance was computed. Maps are
kept preprocessed as SpRAy sees them (channels summed, sum-pooled, normalised by Σ|R|, flattened) for the per-class
test, and the relevance per channel at the archive's monitor layer for the cross-class one. Photos are read and
explained batch by batch (:func:`explain_with_archive`), so memory does not grow with their number beyond what is kept.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unhans.core.errors import InputError
from unhans.core.spray import preprocess

REFERENCE_FILE = "reference.npz"


@dataclass
class Reference:
    """Preprocessed relevance of trusted samples with what the served model predicted for them.

    ``map_shape`` is the (H, W) of the raw maps (records of another shape come from another model and are
    rejected); ``scores`` are the artifact detector's scores (None when the model has no detector).
    """

    features: np.ndarray  # (N, D) float32, rows as SpRAy preprocesses them
    predictions: np.ndarray  # (N,) predicted class
    scores: np.ndarray | None  # (N,) artifact detector score, > 0 means the artifact is there
    classes: list[str]
    map_shape: tuple[int, int]
    pooling: int
    model: str
    version: str
    latent: np.ndarray | None = None  # (N, C) relevance per channel at the monitor layer (None: archive without one)
    groups: np.ndarray | None = None  # (N,) the trusted photo of each row: augmented views of one photo share it
    monitor_layer: str | None = None

    @classmethod
    def from_relevance(cls, relevance: np.ndarray, predictions: np.ndarray, classes: list[str], model: str, version: str,
                       scores: np.ndarray | None = None, pooling: int = 2, latent: np.ndarray | None = None,
                       groups: np.ndarray | None = None, monitor_layer: str | None = None) -> "Reference":
        """From raw maps (N, C, H, W) or (N, H, W), as the handler's sampler records them (channels summed), and
        optionally the relevance per channel at ``monitor_layer`` (N, C) with each row's trusted photo (``groups``;
        default: every row its own)."""
        relevance = np.asarray(relevance)
        if relevance.ndim not in (3, 4):
            raise InputError("relevance", f"has shape {relevance.shape}", "pass maps as (N, C, H, W) or (N, H, W)")
        return cls.from_features(preprocess(relevance, pooling), predictions, classes, tuple(relevance.shape[-2:]), pooling, model,
                                 version, scores, latent, groups, monitor_layer)

    @classmethod
    def from_features(cls, features: np.ndarray, predictions: np.ndarray, classes: list[str], map_shape: tuple[int, int],
                      pooling: int, model: str, version: str, scores: np.ndarray | None = None, latent: np.ndarray | None = None,
                      groups: np.ndarray | None = None, monitor_layer: str | None = None) -> "Reference":
        """From maps already preprocessed (:func:`unhans.core.spray.preprocess`), checked row for row."""
        predictions = np.asarray(predictions, np.int64).ravel()
        n = len(features)
        if len(predictions) != n or (scores is not None and len(scores) != n):
            raise InputError("predictions", f"{len(predictions)} predictions for {n} maps", "pass one per map")
        if n == 0:
            raise InputError("data", "holds no trusted sample", "pass trusted images")
        if predictions.min() < 0 or predictions.max() >= len(classes):
            raise InputError("predictions", f"name classes outside 0-{len(classes) - 1}", "pass the model's class names")
        for name, value in (("latent", latent), ("groups", groups)):
            if value is not None and len(value) != n:
                raise InputError(name, f"has {len(value)} rows for {n} maps", "pass one per map")
        groups = np.arange(n) if groups is None else np.asarray(groups, np.int64).ravel()
        return cls(np.asarray(features, np.float32), predictions, None if scores is None else np.asarray(scores, np.float64).ravel(),
                   list(classes), tuple(map_shape), pooling, model, version,
                   None if latent is None else np.asarray(latent, np.float32), groups, monitor_layer if latent is not None else None)

    @property
    def photos(self) -> int:
        """How many trusted photos the reference was built from."""
        return len(np.unique(self.groups)) if self.groups is not None else len(self.predictions)

    def pool(self, class_index: int) -> np.ndarray:
        """Rows of the reference the model predicted as ``class_index``."""
        return np.flatnonzero(self.predictions == class_index)

    def fingerprint(self) -> str:
        """Changes whenever the reference does: a calibration is only valid for the reference it was made on."""
        digest = hashlib.sha256(self.features.tobytes() + self.predictions.tobytes())
        digest.update(json.dumps([self.classes, list(self.map_shape), self.pooling, self.model, self.version]).encode())
        for extra in (self.scores, self.latent, self.groups):
            if extra is not None:
                digest.update(extra.tobytes())
        digest.update(str(self.monitor_layer).encode())
        return digest.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        partial = path.with_name(path.name + ".partial.npz")
        extra = {k: v for k, v in (("scores", self.scores), ("latent", self.latent), ("groups", self.groups)) if v is not None}
        if self.monitor_layer:
            extra["monitor_layer"] = self.monitor_layer
        np.savez_compressed(partial, features=self.features, predictions=self.predictions, classes=np.asarray(self.classes),
                            map_shape=np.asarray(self.map_shape), pooling=self.pooling, model=self.model, version=self.version, **extra)
        partial.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        path = Path(path)
        if not path.is_file():
            raise InputError(str(path), "does not exist", "build the reference first with 'unhans monitor reference'")
        with np.load(path) as data:
            optional = {k: data[k] if k in data else None for k in ("scores", "latent", "groups")}
            return cls(data["features"], data["predictions"], optional["scores"],
                       [str(c) for c in data["classes"]], tuple(int(s) for s in data["map_shape"]), int(data["pooling"]),
                       str(data["model"]), str(data["version"]), optional["latent"],
                       optional["groups"] if optional["groups"] is not None else np.arange(len(data["predictions"])),
                       str(data["monitor_layer"]) if "monitor_layer" in data else None)


def in_batches(images: np.ndarray, batch_size: int = 64, groups: np.ndarray | None = None):
    """``(images, groups)`` batches of an array of model inputs for :func:`explain_with_archive` (each row its own
    photo unless ``groups`` says otherwise)."""
    groups = np.arange(len(images)) if groups is None else np.asarray(groups)
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size], groups[start:start + batch_size]


def explain_with_archive(archive: str | Path, batches, pooling: int = 2, show_progress: bool = False, total: int | None = None) -> Reference:
    """The reference of trusted images by the model in a TorchServe archive (.mar or folder).

    ``batches`` yields ``(images, groups)``: model inputs (n, C, H, W) and each row's trusted photo. Uses the handler's
    own code paths: :meth:`Explainer.with_latent` for relevance of the predicted class (and at the archive's monitor
    layer) and the archive's prediction graph for the detector score, so the reference matches what the sampler records
    while serving. Each batch is preprocessed and dropped before the next is read; ``total`` (rows) sizes the progress bar.
    """
    from rich.progress import Progress

    from unhans.core.serving import FILES, ServingConfig, class_names, manifest, unpacked
    from unhans.export.graph import SCORE_OUTPUT
    from unhans.export.runtime import run_batched, session
    from unhans.handlers.relevance import Explainer
    from unhans.output import console

    with unpacked(archive) as folder:
        model = manifest(folder)
        names = class_names(folder)
        graph = session(str(folder / model["serializedFile"]))
        scored = SCORE_OUTPUT in [o.name for o in graph.get_outputs()]
        explainer = Explainer(str(folder), ServingConfig.from_yaml(folder / FILES.config).composite)
        parts: dict[str, list] = {"features": [], "predictions": [], "scores": [], "latent": [], "groups": []}
        map_shape, classes = None, 0
        with Progress(console=console, disable=not show_progress, transient=True) as progress:
            task = progress.add_task("explaining trusted images with the served model", total=total)
            for images, groups in batches:
                images = np.ascontiguousarray(images, np.float32)
                logits, heat, _, latent = explainer.with_latent(images)
                map_shape, classes = heat.shape[-2:], logits.shape[1]
                parts["features"].append(preprocess(heat.sum(axis=1), pooling))
                parts["predictions"].append(logits.argmax(1))
                parts["groups"].append(np.asarray(groups))
                if latent is not None:
                    parts["latent"].append(latent)
                if scored:
                    parts["scores"].append(run_batched(graph, images, [SCORE_OUTPUT])[0].ravel())
                progress.advance(task, len(images))
        if map_shape is None:
            raise InputError("data", "holds no trusted image", "pass trusted images")
    joined = {k: np.concatenate(v) if v else None for k, v in parts.items()}
    return Reference.from_features(joined["features"], joined["predictions"], [names.get(str(i), str(i)) for i in range(classes)],
                                   map_shape, pooling, model["modelName"], str(model.get("modelVersion", "1.0")), joined["scores"],
                                   joined["latent"], joined["groups"], explainer.monitor_layer)
