"""What every benchmark ends with: a table of its figures against their targets, and optionally a JSON file."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
