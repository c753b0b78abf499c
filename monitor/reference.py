"""The monitor's reference: how the served model explains trusted data, per predicted class.

Built once, before monitoring, by explaining a trusted dataset with the very model that serves (the archive's
explain graph or its zennit twin, through the handler's own :class:`~unhans.handlers.relevance.Explainer`), so a
window of served traffic and the reference differ only in the data, never in how relevance was computed. Maps are
kept preprocessed as SpRAy sees them (channels summed, sum-pooled, normalised by Σ|R|, flattened).
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

    @classmethod
    def from_relevance(cls, relevance: np.ndarray, predictions: np.ndarray, classes: list[str], model: str, version: str,
                       scores: np.ndarray | None = None, pooling: int = 2) -> "Reference":
        """From raw maps (N, C, H, W) or (N, H, W), as the handler's sampler records them (channels summed)."""
        relevance = np.asarray(relevance)
        if relevance.ndim not in (3, 4):
            raise InputError("relevance", f"has shape {relevance.shape}", "pass maps as (N, C, H, W) or (N, H, W)")
        predictions = np.asarray(predictions, np.int64).ravel()
        if len(predictions) != len(relevance) or (scores is not None and len(scores) != len(relevance)):
            raise InputError("predictions", f"{len(predictions)} predictions for {len(relevance)} maps", "pass one per map")
        if predictions.min() < 0 or predictions.max() >= len(classes):
            raise InputError("predictions", f"name classes outside 0-{len(classes) - 1}", "pass the model's class names")
        return cls(preprocess(relevance, pooling), predictions, None if scores is None else np.asarray(scores, np.float64).ravel(),
                   list(classes), tuple(relevance.shape[-2:]), pooling, model, version)

    def pool(self, class_index: int) -> np.ndarray:
        """Rows of the reference the model predicted as ``class_index``."""
        return np.flatnonzero(self.predictions == class_index)

    def fingerprint(self) -> str:
        """Changes whenever the reference does: a calibration is only valid for the reference it was made on."""
        digest = hashlib.sha256(self.features.tobytes() + self.predictions.tobytes())
        digest.update(json.dumps([self.classes, list(self.map_shape), self.pooling, self.model, self.version]).encode())
        if self.scores is not None:
            digest.update(self.scores.tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        partial = path.with_name(path.name + ".partial.npz")
        extra = {} if self.scores is None else {"scores": self.scores}
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
            return cls(data["features"], data["predictions"], data["scores"] if "scores" in data else None,
                       [str(c) for c in data["classes"]], tuple(int(s) for s in data["map_shape"]), int(data["pooling"]),
                       str(data["model"]), str(data["version"]))


def explain_with_archive(archive: str | Path, images: np.ndarray, batch_size: int = 64) -> dict:
    """Relevance, predictions and artifact scores of ``images`` by the model in a TorchServe archive (.mar or folder).

    Uses the handler's own code paths: :class:`Explainer` for relevance of the predicted class and the archive's
    prediction graph for the detector score, so the reference matches what the sampler records while serving.
    """
    from unhans.core.serving import FILES, ServingConfig, class_names, manifest, unpacked
    from unhans.export.graph import SCORE_OUTPUT
    from unhans.export.runtime import run_batched, session
    from unhans.handlers.relevance import Explainer

    with unpacked(archive) as folder:
        model = manifest(folder)
        names = class_names(folder)
        graph = session(str(folder / model["serializedFile"]))
        outputs = [o.name for o in graph.get_outputs()]
        explainer = Explainer(str(folder), ServingConfig.from_yaml(folder / FILES.config).composite)
        relevance, predictions = [], []
        for start in range(0, len(images), batch_size):
            logits, heat, _ = explainer(np.ascontiguousarray(images[start:start + batch_size], np.float32))
            relevance.append(heat.sum(axis=1))
            predictions.append(logits.argmax(1))
        scores = run_batched(graph, images, [SCORE_OUTPUT])[0].ravel() if SCORE_OUTPUT in outputs else None
    classes = [names.get(str(i), str(i)) for i in range(logits.shape[1])]
    return {"relevance": np.concatenate(relevance), "predictions": np.concatenate(predictions), "scores": scores,
            "classes": classes, "model": model["modelName"], "version": str(model.get("modelVersion", "1.0"))}
