"""``unhans monitor reference`` and ``unhans monitor run``: thin click layers over :mod:`unhans.monitor`."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ..core.contract import IMAGE_SUFFIXES
from ..core.errors import InputError
from ..output import console, print_table
from .carry import CARRY_WINDOWS


@click.group("monitor")
def monitor_group():
    """Watch served traffic for new Clever-Hans strategies: SpRAy on windows of the sink, Prometheus metrics, alerts."""


@monitor_group.command("reference")
@click.option("--archive", required=True, type=click.Path(), help="The served model: NAME.mar from 'unhans archive' (or its unpacked folder).")
@click.option("--data", required=True, help="Trusted data: a folder of photos (any classes, sub-folders included, no labels needed; read through the archive's input contract), an .npz file of model inputs, a run folder's dataset.npz (its clean test set), 'mnist' or 'digits'.")
@click.option("--state", "state_dir", required=True, type=click.Path(file_okay=False), help="The monitor's state folder to create.")
@click.option("--pooling", type=click.IntRange(1), default=2, show_default=True, help="Sum-pool maps PxP before SpRAy.")
@click.option("--augment", type=click.IntRange(0), default=0, show_default=True,
              help="Random views (crops of 60-100%% of each side, mirrored half the time) added per photo of a folder; a photo's views count as one.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="Images read and explained at a time (LRP keeps every activation of a batch: EfficientNet-Lite0 at 224 px peaked at 5.2 GB with 32, 2.9 GB with 8).")
def reference_command(archive, data, state_dir, pooling, augment, batch_size):
    """Explain trusted data with the served model: the reference that windows of traffic are compared with."""
    from ..core.serving import unpacked
    from .crossclass import MIN_REFERENCE
    from .detector import DriftDetector
    from .reference import REFERENCE_FILE, explain_with_archive

    with unpacked(archive) as folder:  # once: the contract and the model both come from it
        batches, total, skipped = _trusted_batches(data, folder, augment, batch_size)
        console.print(f"explaining {total} trusted images with the model in {archive}")
        reference = explain_with_archive(folder, batches, pooling, show_progress=True, total=total)
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    path = reference.save(Path(state_dir) / REFERENCE_FILE)
    counts = np.bincount(reference.predictions, minlength=len(reference.classes))
    per_class = DriftDetector()
    capacity = int(np.ceil(per_class.min_samples / per_class.max_reference_share))
    covered = int((counts >= capacity).sum())
    if reference.latent is None:
        cross = "off: the archive has no monitor layer (archive it again with this version of unhans)"
    elif len(reference.latent) < MIN_REFERENCE:
        cross = f"off: {len(reference.latent)} samples, it needs {MIN_REFERENCE}"
    else:
        cross = f"every class, on relevance per channel at {reference.monitor_layer} ({reference.latent.shape[1]} channels)"
    print_table(f"unhans monitor reference -> {path}", {
        "model": f"{reference.model} {reference.version}",
        "trusted samples": f"{len(reference.predictions)} from {reference.photos} photos" + (f" ({skipped[0]} unreadable files skipped)" if skipped[0] else ""),
        "classes predicted": f"{int((counts > 0).sum())} of {len(reference.classes)} (samples per class: max {counts.max()})",
        "cross-class test (new strategies in any class)": cross,
        "per-class SpRAy test": f"{covered} classes with at least {capacity} samples; the other classes are watched by the cross-class test only",
        "artifact detector flags": "no detector" if reference.scores is None else f"{(reference.scores > 0).mean():.2%}",
    })


def _trusted_batches(data: str, archive: Path, augment: int, batch_size: int):
    """(batches of (model inputs, photo ids), how many rows they hold, [unreadable files]) of the trusted data.

    A folder is read lazily, photo by photo, through the (unpacked) ``archive``'s input contract, as the handler reads
    served photos, each photo plain and in ``augment`` random views; unreadable files are skipped and counted (the
    count fills in as the batches are read). Arrays (a run's dataset.npz gives its clean test set, never its poisoned
    training set; an .npz of model inputs; mnist/digits) are cut into batches as they are."""
    from ..core.data import load_dataset
    from ..core.serving import FILES, ServingConfig
    from .reference import in_batches

    path = Path(data)
    skipped = [0]
    if path.is_dir():
        contract = ServingConfig.from_yaml(Path(archive) / FILES.config).contract
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError(str(path), "holds no PNG/JPEG images", "pass a folder of trusted photos (sub-folders are read too)")

        def batches():
            from PIL import Image, UnidentifiedImageError

            rng = np.random.default_rng(0)
            images, groups = [], []
            for photo, file in enumerate(files):
                try:
                    with Image.open(file) as picture:
                        picture.load()
                        views = [contract.pixels(picture)] + [contract.view(picture, rng) for _ in range(augment)]
                except (UnidentifiedImageError, OSError, ValueError):
                    skipped[0] += 1
                    continue
                images += views
                groups += [photo] * len(views)
                if len(images) >= batch_size:
                    yield contract.normalise(np.stack(images)), np.array(groups)
                    images, groups = [], []
            if images:
                yield contract.normalise(np.stack(images)), np.array(groups)

        return batches(), len(files) * (1 + augment), skipped
    images = None
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as z:
            if "test_images" in z:  # a run's scenario file (unhans train)
                from ..core.poison import load_scenario

                images = load_scenario(path)[1].images
    if images is None:
        images = load_dataset(data).images
    return in_batches(images, batch_size), len(images), skipped


@monitor_group.command("run")
@click.option("--state", "state_dir", required=True, type=click.Path(file_okay=False, exists=True), help="State folder with the reference.")
@click.option("--sink", required=True, help="Where the handler samples to: a folder or an fsspec URL (e.g. s3://bucket/unhans).")
@click.option("--window-size", type=click.IntRange(10), default=1000, show_default=True, help="Records per window.")
@click.option("--window-seconds", type=click.FloatRange(0, min_open=True), help="Also close a window once its records span this long.")
@click.option("--false-alarm-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.001, show_default=True,
              help="Chance that a window like the reference raises a new-strategy alert (all classes together).")
@click.option("--resamples", type=click.IntRange(20), default=100, show_default=True, help="Resampled reference windows per class and size.")
@click.option("--min-samples", type=click.IntRange(12), default=30, show_default=True, help="Fewest samples of a class worth analysing.")
@click.option("--max-class-samples", type=click.IntRange(12), default=500, show_default=True, help="Analyse a larger class on a subsample.")
@click.option("--neighbors", "n_neighbors", type=click.IntRange(1), default=10, show_default=True, help="k of SpRAy's kNN graph.")
@click.option("--carry-windows", type=click.IntRange(0), default=CARRY_WINDOWS, show_default=True,
              help="Windows a class's samples wait for more of their class when one window brings fewer than --min-samples (0: none wait).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address for /metrics and /evidence/.")
@click.option("--port", type=click.IntRange(0, 65535), default=9108, show_default=True, help="Port for /metrics and /evidence/ (0: any free).")
@click.option("--exit-when-idle", is_flag=True, help="Stop when the sink holds no complete window more (for replays and tests).")
def run_command(state_dir, sink, window_size, window_seconds, false_alarm_rate, resamples, min_samples, max_class_samples,
                n_neighbors, carry_windows, host, port, exit_when_idle):
    """Analyse windows of sampled traffic until stopped; resumes where it stopped."""
    from .detector import DriftDetector
    from .service import run_monitor

    if min_samples <= n_neighbors:
        raise InputError("--min-samples", f"is {min_samples}", f"use more than --neighbors ({n_neighbors})")
    detector = DriftDetector(false_alarm_rate=false_alarm_rate, n_resamples=resamples, n_neighbors=n_neighbors,
                             min_samples=min_samples, max_class_samples=max_class_samples)
    done = run_monitor(state_dir, sink, detector, window_size, window_seconds, host, port, follow=not exit_when_idle,
                       carry_windows=carry_windows)
    console.print(f"{done} windows analysed; state in {state_dir}")
