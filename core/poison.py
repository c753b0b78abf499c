"""Poisoned training data whose ground truth is known: which samples carry the artifact, and where.

Two ways spurious artifacts enter real data sets:

- *backdoor*: the artifact is pasted into a fraction of every other class's images, which are relabelled to the
  target class (an attacker, or a labelling shortcut);
- *co-occurrence*: the artifact is pasted into a fraction of the target class's own images, labels unchanged
  (a watermark that one source of one class happens to carry).

Either way the model can learn "artifact means target". The records kept here are what SpRAy and the CAVs are
scored against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .artifacts import Artifact, artifact_from_dict
from .data import ImageDataset
from .errors import InputError

POISON_MODES = ("backdoor", "cooccurrence")


@dataclass
class PoisonedDataset(ImageDataset):
    """An :class:`ImageDataset` that records, per sample, whether the artifact was pasted in and where."""

    has_artifact: np.ndarray | None = None  # bool (N,)
    masks: np.ndarray | None = None  # bool (N, H, W); all False for clean samples
    original_labels: np.ndarray | None = None  # labels before any relabelling
    target: int = 0
    mode: str = "backdoor"
    fraction: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        n, (_, h, w) = len(self), self.image_shape
        self.has_artifact = np.zeros(n, bool) if self.has_artifact is None else np.asarray(self.has_artifact, bool)
        self.masks = np.zeros((n, h, w), bool) if self.masks is None else np.asarray(self.masks, bool)
        self.original_labels = self.labels.copy() if self.original_labels is None else np.asarray(self.original_labels, np.int64)


def _check(dataset: ImageDataset, target: int, fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise InputError("fraction", f"{fraction} is outside [0, 1]", "pass the share of images to poison, e.g. 0.1")
    if not 0 <= target < dataset.num_classes:
        raise InputError("target", f"class {target} does not exist", f"use a class index 0-{dataset.num_classes - 1}")


def poison(dataset: ImageDataset, artifact: Artifact | None, target: int, fraction: float, mode: str = "backdoor", seed: int = 0) -> PoisonedDataset:
    """Paste ``artifact`` into ``fraction`` of the images of each source class (see the module docstring); ``None``
    (or ``fraction`` 0) adds none and records none."""
    if mode not in POISON_MODES:
        raise InputError("poison", f"mode {mode!r} is unknown", f"use one of {POISON_MODES}")
    _check(dataset, target, fraction)
    if artifact is None or fraction == 0:
        return PoisonedDataset(dataset.images.copy(), dataset.labels.copy(), list(dataset.classes), dataset.source,
                               target=target, mode=mode, fraction=0.0)
    rng = np.random.default_rng(seed)
    source_classes = [c for c in range(dataset.num_classes) if c != target] if mode == "backdoor" else [target]
    chosen = []
    for c in source_classes:
        members = np.flatnonzero(dataset.labels == c)
        chosen.append(rng.choice(members, size=int(round(fraction * len(members))), replace=False))
    chosen = np.sort(np.concatenate(chosen)).astype(np.int64)
    images, labels = dataset.images.copy(), dataset.labels.copy()
    masks = np.zeros((len(dataset), *dataset.image_shape[1:]), bool)
    images[chosen], masks[chosen] = artifact.apply(images[chosen], seed=seed)
    if mode == "backdoor":
        labels[chosen] = target
    has_artifact = np.zeros(len(dataset), bool)
    has_artifact[chosen] = True
    return PoisonedDataset(
        images, labels, list(dataset.classes), dataset.source,
        has_artifact=has_artifact, masks=masks, original_labels=dataset.labels.copy(),
        target=target, mode=mode, fraction=fraction,
    )


def attacked(dataset: ImageDataset, artifact: Artifact | None, target: int, seed: int = 0) -> PoisonedDataset:
    """Every non-target image with the artifact pasted in, labels kept: the attack-success test set (empty where no
    artifact was added: there is nothing to attack with)."""
    _check(dataset, target, 1.0)
    keep = dataset.labels != target
    clean = dataset.subset(keep if artifact is not None else np.zeros(len(dataset), bool))
    images, masks = artifact.apply(clean.images, seed=seed) if artifact is not None else (clean.images, None)
    return PoisonedDataset(
        images, clean.labels, list(clean.classes), clean.source,
        has_artifact=np.ones(len(clean), bool), masks=masks, original_labels=clean.labels, target=target, mode="attacked", fraction=1.0,
    )


def save_scenario(path, train: PoisonedDataset, test: ImageDataset, attack: PoisonedDataset, artifact: Artifact | None) -> None:
    """Write the exact data a model was trained and scored on, readable by :func:`load_npz` as its training set."""
    np.savez_compressed(
        path,
        images=train.images, labels=train.labels, classes=np.asarray(train.classes),
        has_artifact=train.has_artifact, masks=train.masks, original_labels=train.original_labels,
        test_images=test.images, test_labels=test.labels,
        attacked_images=attack.images, attacked_labels=attack.labels, attacked_masks=attack.masks,
        scenario=np.asarray(json.dumps({
            "target": train.target, "mode": train.mode, "fraction": train.fraction,
            "source": train.source, "artifact": artifact.to_dict() if artifact is not None else None,
        })),
    )


def load_scenario(path) -> tuple[PoisonedDataset, ImageDataset, PoisonedDataset, Artifact | None]:
    """Inverse of :func:`save_scenario`: (poisoned train set, clean test set, attacked test set, artifact or None)."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["scenario"]))
        classes = [str(c) for c in z["classes"]]
        train = PoisonedDataset(
            z["images"], z["labels"], classes, meta["source"], has_artifact=z["has_artifact"], masks=z["masks"],
            original_labels=z["original_labels"], target=meta["target"], mode=meta["mode"], fraction=meta["fraction"],
        )
        test = ImageDataset(z["test_images"], z["test_labels"], classes, meta["source"])
        attack = PoisonedDataset(
            z["attacked_images"], z["attacked_labels"], classes, meta["source"], has_artifact=np.ones(len(z["attacked_labels"]), bool),
            masks=z["attacked_masks"], target=meta["target"], mode="attacked", fraction=1.0,
        )
    return train, test, attack, artifact_from_dict(meta["artifact"]) if meta["artifact"] else None
