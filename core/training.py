"""Train and score models on (poisoned) data, on CPU, with a progress bar and a seed.

A training *run* is a folder that everything downstream reads: ``model.py`` + ``weights.pt`` (TorchServe-style),
``dataset.npz`` (the exact poisoned train, clean test and attacked test sets, see
:func:`unhans.core.poison.save_scenario`) and ``metrics.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from ..output import console
from .artifacts import Artifact
from .data import ImageDataset, load_dataset, stratified_split
from .models import load_model, model_class_from_file, write_model_file
from .poison import attacked, load_scenario, poison, save_scenario
from .run_folder import DATASET_FILE, METRICS_FILE, MODEL_FILE, WEIGHTS_FILE


def fit(model: nn.Module, dataset: ImageDataset, epochs: int, batch_size: int = 64, lr: float = 1e-3,
        seed: int = 0, show_progress: bool = True, description: str = "training") -> list[float]:
    """Adam on cross-entropy; returns the mean loss of each epoch. Deterministic for a given seed.

    Progress is a bar on a terminal and one plain line per epoch elsewhere (a log file), where a bar never shows.
    """
    torch.manual_seed(seed)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    images, labels = torch.from_numpy(dataset.images), torch.from_numpy(dataset.labels)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(dataset) // batch_size)
    losses = []
    model.train()
    with Progress(console=console, disable=not show_progress, transient=False) as progress:
        task = progress.add_task(description, total=epochs * steps_per_epoch)
        for epoch in range(epochs):
            order = torch.from_numpy(rng.permutation(len(dataset)))
            total = 0.0
            for start in range(0, len(dataset), batch_size):
                batch = order[start : start + batch_size]
                optimiser.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
                loss.backward()
                optimiser.step()
                total += loss.item() * len(batch)
                progress.advance(task)
            losses.append(total / len(dataset))
            status = f"{description} (epoch {epoch + 1}/{epochs}, loss {losses[-1]:.3f})"
            progress.update(task, description=status)
            if show_progress and not console.is_terminal:
                console.print(f"{status}, {time.perf_counter() - started:.0f} s", highlight=False)
    model.eval()
    return losses


@torch.no_grad()
def probabilities(model: nn.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Softmax of the model's logits for each image (N, classes)."""
    model.eval()
    with torch.no_grad():
        out = [model(torch.from_numpy(images[i : i + batch_size])).softmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def predict(model: nn.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Predicted class of each image."""
    chances = probabilities(model, images, batch_size)
    return chances.argmax(1) if len(chances) else np.zeros(0, np.int64)


def clean_accuracy(model: nn.Module, test: ImageDataset) -> float:
    """Share of clean test images classified correctly."""
    return float((predict(model, test.images) == test.labels).mean())


def attack_success(model: nn.Module, attack: ImageDataset, target: int) -> float | None:
    """Share of non-target images carrying the artifact that the model assigns to the target class; None where no
    artifact was added (an empty attacked set)."""
    return float((predict(model, attack.images) == target).mean()) if len(attack) else None


@dataclass
class TrainSpec:
    """Everything that decides a training run; stored in its metrics.json."""

    data: str = "mnist"
    architecture: str = "vgg"
    mode: str = "backdoor"
    target: int | str = 0
    fraction: float = 0.1
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    test_fraction: float = 0.2
    seed: int = 0


def train_run(spec: TrainSpec, artifact: Artifact | None, out_dir: str | Path, show_progress: bool = True) -> dict:
    """Poison, train and score a model; write the run folder; return the metrics. With ``spec.fraction`` 0 (data
    poisoned elsewhere, or none) no artifact is added, and the metrics record none: ``artifact`` and
    ``attack_success`` are None, since an attack with an artifact the model never saw measures nothing."""
    out_dir = Path(out_dir)
    if spec.fraction == 0:
        artifact = None
    dataset = load_dataset(spec.data)
    target = dataset.class_index(spec.target)
    train_clean, test = stratified_split(dataset, spec.test_fraction, spec.seed)
    train = poison(train_clean, artifact, target, spec.fraction, spec.mode, spec.seed)
    attack = attacked(test, artifact, target, spec.seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    channels, size, _ = dataset.image_shape
    model_file = write_model_file(spec.architecture, out_dir / MODEL_FILE, channels, size, dataset.num_classes)

    torch.manual_seed(spec.seed)
    model = model_class_from_file(model_file)()
    started = time.perf_counter()
    losses = fit(model, train, spec.epochs, spec.batch_size, spec.lr, spec.seed, show_progress, f"training {spec.architecture}")
    seconds = time.perf_counter() - started
    torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)
    save_scenario(out_dir / DATASET_FILE, train, test, attack, artifact)
    metrics = {
        "clean_acc": clean_accuracy(model, test),
        "attack_success": attack_success(model, attack, target),
        "train_seconds": round(seconds, 2),
        "final_loss": losses[-1],
        "n_train": len(train), "n_test": len(test), "n_poisoned": int(train.has_artifact.sum()),
        "spec": {**spec.__dict__, "target": target},
        "artifact": artifact.to_dict() if artifact is not None else None,
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


def load_run(run_dir: str | Path):
    """The trained model and its scenario from a run folder: (model, train, test, attacked, artifact)."""
    run_dir = Path(run_dir)
    model = load_model(run_dir / MODEL_FILE, run_dir / WEIGHTS_FILE)
    return (model, *load_scenario(run_dir / DATASET_FILE))
