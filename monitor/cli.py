"""``unhans monitor reference`` and ``unhans monitor run``: thin click layers over :mod:`unhans.monitor`."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ..core.errors import InputError
from ..output import console, print_table


@click.group("monitor")
def monitor_group():
    """Watch served traffic for new Clever-Hans strategies: SpRAy on windows of the sink, Prometheus metrics, alerts."""


@monitor_group.command("reference")
@click.option("--archive", required=True, type=click.Path(), help="The served model: NAME.mar from 'unhans archive' (or its unpacked folder).")
@click.option("--data", required=True, help="Trusted data: an .npz file of model inputs, an image folder (read through the archive's input contract), a run folder's dataset.npz (its clean test set), 'mnist' or 'digits'.")
@click.option("--state", "state_dir", required=True, type=click.Path(file_okay=False), help="The monitor's state folder to create.")
@click.option("--pooling", type=click.IntRange(1), default=2, show_default=True, help="Sum-pool maps PxP before SpRAy.")
def reference_command(archive, data, state_dir, pooling):
    """Explain trusted data with the served model: the reference that windows of traffic are compared with."""
    from ..core.serving import unpacked
    from .reference import REFERENCE_FILE, Reference, explain_with_archive

    with unpacked(archive) as folder:  # once: the contract and the model both come from it
        images = _trusted_images(data, folder)
        console.print(f"explaining {len(images)} trusted images with the model in {archive}")
        explained = explain_with_archive(folder, images)
    reference = Reference.from_relevance(explained["relevance"], explained["predictions"], explained["classes"], explained["model"],
                                         explained["version"], explained["scores"], pooling)
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    path = reference.save(Path(state_dir) / REFERENCE_FILE)
    counts = np.bincount(reference.predictions, minlength=len(reference.classes))
    print_table(f"unhans monitor reference -> {path}", {
        "model": f"{reference.model} {reference.version}", "trusted samples": len(images),
        "samples per predicted class (min / max)": f"{counts.min()} / {counts.max()}",
        "artifact detector flags": "no detector" if reference.scores is None else f"{(reference.scores > 0).mean():.2%}",
    })


def _trusted_images(data: str, archive: Path) -> np.ndarray:
    """Images of the trusted data; a run's dataset.npz gives its clean test set, never its poisoned training set. An
    image folder is brought to the model's input by the contract of the (unpacked) ``archive``, as the handler brings
    served photos."""
    from ..core.data import load_dataset
    from ..core.serving import FILES, ServingConfig

    path = Path(data)
    if path.is_dir():
        return load_dataset(data, contract=ServingConfig.from_yaml(Path(archive) / FILES.config).contract).images
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as z:
            if "test_images" in z:  # a run's scenario file (unhans train)
                from ..core.poison import load_scenario

                return load_scenario(path)[1].images
    return load_dataset(data).images


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
@click.option("--host", default="127.0.0.1", show_default=True, help="Address for /metrics and /evidence/.")
@click.option("--port", type=click.IntRange(0, 65535), default=9108, show_default=True, help="Port for /metrics and /evidence/ (0: any free).")
@click.option("--exit-when-idle", is_flag=True, help="Stop when the sink holds no complete window more (for replays and tests).")
def run_command(state_dir, sink, window_size, window_seconds, false_alarm_rate, resamples, min_samples, max_class_samples,
                n_neighbors, host, port, exit_when_idle):
    """Analyse windows of sampled traffic until stopped; resumes where it stopped."""
    from .detector import DriftDetector
    from .service import run_monitor

    if min_samples <= n_neighbors:
        raise InputError("--min-samples", f"is {min_samples}", f"use more than --neighbors ({n_neighbors})")
    detector = DriftDetector(false_alarm_rate=false_alarm_rate, n_resamples=resamples, n_neighbors=n_neighbors,
                             min_samples=min_samples, max_class_samples=max_class_samples)
    done = run_monitor(state_dir, sink, detector, window_size, window_seconds, host, port, follow=not exit_when_idle)
    console.print(f"{done} windows analysed; state in {state_dir}")
