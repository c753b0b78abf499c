"""What every benchmark ends with: a table of its figures against their targets, and optionally a JSON file."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from rich.console import Console
from rich.table import Table


def report(title: str, figures: dict, targets: dict, json_path: Path | None) -> None:
    """Print ``figures`` (name -> value) beside their ``targets``; write them as one JSON object to ``json_path``."""
    table = Table(title=title)
    for column in ("figure", "value", "target"):
        table.add_column(column)
    for key, value in figures.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(key, shown, targets.get(key, ""))
    Console().print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2))


def throughput(server, name: str, bodies: list[bytes], endpoint: str = "predictions", content_type: str = "image/png",
               clients: int = 16, path: str | None = None) -> float:
    """Requests per second that ``clients`` concurrent keep-alive clients get for ``bodies`` from ``/endpoint/name`` (or
    ``path``) of a local server (:class:`unhans.local_server.LocalServer`); every answer must be a 200."""
    path = path or f"/{endpoint}/{name}"
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(lambda body: server.post(path, body, content_type)[0], bodies))
    assert all(s == 200 for s in statuses), statuses
    return len(bodies) / (time.perf_counter() - started)


def paired_loss_pct(rate: Callable[[str], float], plain: str, changed: str, pairs: int) -> list[float]:
    """Per pair of rounds, the percent of ``plain``'s rate that ``changed`` loses (``rate(name)``: one round's requests
    per second); which side goes first alternates, so a machine drifting in speed hits both alike. Take the median:
    single pairs scatter by about +-15% on a small machine."""
    lost = []
    for r in range(pairs):
        pair = {name: rate(name) for name in ((plain, changed) if r % 2 else (changed, plain))}
        lost.append(100 * (1 - pair[changed] / pair[plain]))
    return lost


def latency_ms(server, paths: list[str], bodies: list[bytes], content_type: str = "image/png") -> dict[str, float]:
    """Median milliseconds of one request at a time to each of ``paths`` (e.g. ``/explanations/ours``), the paths
    interleaved body by body so a slow phase of the machine hits all alike; every answer must be a 200."""
    import statistics

    times = {path: [] for path in paths}
    for body in bodies:
        for path in paths:
            started = time.perf_counter()
            status, answer = server.post(path, body, content_type)
            times[path].append(time.perf_counter() - started)
            assert status == 200, (path, answer)
    return {path: 1000 * statistics.median(values) for path, values in times.items()}


def vgg_archives(run: Path, scratch: Path, store: Path, archives: dict[str, dict]) -> np.ndarray:
    """Archives of the backdoored MNIST VGG (trained into ``run`` if missing) with its correction and explain graph, one
    per name with its ``build_archive`` settings (batch size 8, 5 ms delay unless given); returns its test images."""
    from unhans.core.artifacts import Patch
    from unhans.core.clarc import fit_cav
    from unhans.core.layers import insert_after
    from unhans.core.training import TrainSpec, load_run, train_run
    from unhans.export.archive import build_archive
    from unhans.export.correction import Correction
    from unhans.export.explain import explain_path, export_explain
    from unhans.export.onnx import export_torch

    if not (run / "weights.pt").exists():
        train_run(TrainSpec(), Patch(), run)
    model, train, test, *_ = load_run(run)
    correction = Correction.from_cav(fit_cav(model, "features.pool2", train.images[train.has_artifact], train.images[~train.has_artifact]))
    graph = export_torch(model, "features.pool2", correction, train.images[:64], scratch / "vgg.onnx").path
    export_explain(insert_after(model, "features.pool2", correction.module()), explain_path(graph), probe=train.images[:64], detector=correction)
    for name, settings in archives.items():
        build_archive(graph, run, name, store, **{"batch_size": 8, "max_batch_delay_ms": 5, **settings})
    return test.images
