"""Benchmark: the monitor on a real 1,000-class model, real photos, and a real shortcut appearing in served traffic.

    python bench/monitor_real.py [--json PATH] [--photos ../shared/imagenet-sample] [--cache DIR] [--views 6]

EfficientNet-Lite0 with its ImageNet weights, archived twice with ImageNet's input contract (shorter side 256, centre
crop 224, mean/std): as it is (``unhans archive`` with no ``--onnx``: watched before it is patched) and with the
ImageNet-W correction (a paired CAV at ``_blocks.10``, fitted on the reference photos with and without the watermark).
Photos: the 500 of ``../shared/imagenet-sample`` (one per even ImageNet class), split by position into a reference half
(even positions: 250 photos) and a traffic half (odd positions: 250 photos); nothing of one half is in the other.

* Reference: ``unhans monitor reference --augment 3`` on the reference half (each photo plain and in 3 random views:
  crops of 60-100% of each side, mirrored half the time), run as a subprocess: ``reference_peak_rss_mb`` is its peak.
* Traffic: each traffic photo in ``--views`` random views of the same kind, explained by the archive's own explainer
  (:meth:`unhans.handlers.relevance.Explainer.with_latent`, the code the handler's sampler runs), and each view again with
  the ImageNet-W watermark (PyPI ``imagenet-w``, ``AddWatermark(224)``: 捷径捷径捷径, white, 50% opacity, at 40% of the
  height) pasted on the 224-px view. Windows of 1,000 records are drawn from these pools without replacement (a
  pool of 250 x views, so the 30 clean windows overlap: 30,000 distinct explained requests would take hours on 2
  cores) and analysed by :class:`unhans.monitor.service.Monitor` as ``unhans monitor run`` does (records in memory:
  the sink's reading is measured by bench/monitor.py).

Figures: ``traffic_share_analysed`` (share of a clean window's records that enter some test), ``clean_windows`` and
``false_alerts_clean_windows``, ``windows_to_alert_watermark_10pct`` / ``_2pct`` (windows after the onset until the
first new-strategy alert; 1 = the first watermarked window; 0 = none within 6), ``watermark_alert_on_corrected_archive``
(the corrected archive's monitor, windows of 400 from 125 traffic photos in 4 views, 10% watermarked: a
known-artifact warning and no new-strategy alert),
``window_seconds_1000`` (median analysis time of a window), ``reference_photos_used``, ``reference_peak_rss_mb``,
``sampled_share_at_saturation`` (a real TorchServe with the watch-only archive at its default sampling budget, every
request picked, 8 clients for 60 s: share of answered requests recorded within a minute after) and
``evidence_screenshot`` (the first alert's evidence page in headless Chromium). ``_30pct``, ``_50pct`` and ``_100pct`` say how large a share of
watermarked traffic the test sees (report). Exits 2 when the photos are absent.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import report

TARGETS = {"traffic_share_analysed": ">= 0.9", "clean_windows": ">= 30", "false_alerts_clean_windows": "0",
           "windows_to_alert_watermark_10pct": "1-2", "watermark_alert_on_corrected_archive": "true", "window_seconds_1000": "<= 10",
           "reference_peak_rss_mb": "<= 3000"}
WINDOW, CLEAN_WINDOWS, ONSET_WINDOWS, LAYER = 1000, 30, 6, "_blocks.10"
PATCHED_WINDOW = 400  # the corrected archive's traffic: 125 photos in 4 views
UNHANS = [sys.executable, "-m", "unhans.cli"]


def contract():
    from unhans.core.contract import InputContract
    from unhans.core.models.zoo import IMAGENET_MEAN, IMAGENET_STD

    return InputContract(3, 224, 224, list(IMAGENET_MEAN), list(IMAGENET_STD), resize=256)


def watermarked(pixels: np.ndarray) -> np.ndarray:
    """ImageNet-W's overlay on 224-px views (N, 3, 224, 224) in [0, 1]."""
    from imagenet_w import AddWatermark
    from PIL import Image

    mark = AddWatermark(224)
    out = [np.asarray(mark(Image.fromarray((p.transpose(1, 2, 0) * 255).round().astype(np.uint8))), np.float32) / 255 for p in pixels]
    return np.stack(out).transpose(0, 3, 1, 2)


def archives(cache: Path, reference_files: list[Path], classes: Path) -> dict[str, Path]:
    """The watch-only and the corrected archive (built once into the cache)."""
    from unhans.core.cav import CAV
    from unhans.core.layers import activations
    from unhans.core.models import load_model
    from unhans.core.models.zoo import write_efficientnet_lite0
    from unhans.export.archive import build_archive
    from unhans.export.correction import Correction
    from unhans.export.onnx import export_torch

    store = cache / "store"
    paths = {"watch": store / "lite0watch.mar", "patched": store / "lite0patched.mar"}
    if all(p.is_file() for p in paths.values()):
        return paths
    store.mkdir(parents=True, exist_ok=True)
    model_file, weights = write_efficientnet_lite0(cache / "lite0")
    settings = dict(model_file=model_file, weights=weights, contract=contract(), sample_fraction=1.0, threads=2, force=True,
                    classes=classes if classes.is_file() else None)
    build_archive(None, None, "lite0watch", store, **settings)
    model = load_model(model_file, weights)
    clean = contract().load(reference_files[:150])
    h_clean = activations(model, contract().normalise(clean), LAYER, batch_size=25)
    h_marked = activations(model, contract().normalise(watermarked(clean)), LAYER, batch_size=25)
    correction = Correction.from_cav(CAV().fit_paired(h_marked, h_clean))
    probe = contract().normalise(np.concatenate([clean[:8], watermarked(clean[:8])]))
    graph = export_torch(model, LAYER, correction, probe, cache / "lite0-patched.onnx").path
    build_archive(graph, None, "lite0patched", store, **settings)
    return paths


def reference(cache: Path, archive: Path, reference_dir: Path, name: str) -> tuple[Path, float]:
    """``unhans monitor reference`` as a user runs it (a subprocess): the state folder and its peak RSS in MB."""
    state = cache / f"state-{name}"
    if (state / "reference.npz").is_file():
        return state, json.loads((state / "peak.json").read_text())["peak_rss_mb"]
    started = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([*UNHANS, "monitor", "reference", "--archive", str(archive), "--data", str(reference_dir), "--augment", "3",
                    "--state", str(state)], check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far, in MB
    if peak * 1024 <= started:
        print(f"warning: an earlier child used more memory ({started / 1024:.0f} MB); the figure is an upper bound")
    (state / "peak.json").write_text(json.dumps({"peak_rss_mb": peak}))
    return state, peak


def pool(cache: Path, archive: Path, files: list[Path], views: int, name: str) -> dict:
    """Random views of the traffic photos, clean and watermarked, explained by the archive's explainer (cached)."""
    from PIL import Image

    from unhans.core.serving import unpacked
    from unhans.handlers.relevance import Explainer, thumbnail

    path = cache / f"pool-{name}.npz"
    if path.is_file():
        with np.load(path) as z:
            return dict(z)
    rng = np.random.default_rng(7)
    parts = {k: [] for k in ("logits", "relevance", "latent", "thumbnail", "score")}
    parts = {kind: {k: [] for k in parts} for kind in ("clean", "marked")}
    with unpacked(archive) as folder:
        from unhans.core.serving import FILES, ServingConfig

        explainer = Explainer(str(folder), ServingConfig.from_yaml(folder / FILES.config).composite, threads=2)
        from unhans.export.graph import SCORE_OUTPUT
        from unhans.export.runtime import run_batched, session
        from unhans.core.serving import manifest

        graph = session(str(folder / manifest(folder)["serializedFile"]), threads=2)
        scored = SCORE_OUTPUT in [o.name for o in graph.get_outputs()]
        for start in range(0, len(files), 8):
            pixels = []
            for file in files[start:start + 8]:
                with Image.open(file) as picture:
                    picture.load()
                    pixels += [contract().view(picture, rng) for _ in range(views)]
            pixels = np.stack(pixels)
            for kind, shown in (("clean", pixels), ("marked", watermarked(pixels))):
                inputs = contract().normalise(shown)
                logits, heat, _, latent = explainer.with_latent(inputs)
                target = parts[kind]
                target["logits"].append(logits)
                target["relevance"].append(heat.sum(1).astype(np.float16))
                target["latent"].append(latent)
                target["thumbnail"].append(np.stack([thumbnail(p) for p in shown]))
                target["score"].append(run_batched(graph, inputs, [SCORE_OUTPUT])[0].ravel() if scored else np.full(len(inputs), np.nan))
            print(f"{name}: {min(start + 8, len(files))} of {len(files)} photos explained", flush=True)
    flat = {f"{kind}_{k}": np.concatenate(v) for kind, d in parts.items() for k, v in d.items()}
    np.savez(path, **flat)
    return flat


def records(data: dict, kind: str, rows: np.ndarray, first_id: int):
    from unhans.handlers.sink import Record

    logits = data[f"{kind}_logits"][rows]
    exp = np.exp(logits - logits.max(1, keepdims=True))
    probabilities = exp / exp.sum(1, keepdims=True)
    out = []
    for k, row in enumerate(rows):
        score = float(data[f"{kind}_score"][row])
        out.append(Record(prediction=int(logits[k].argmax()), target=int(logits[k].argmax()), probabilities=probabilities[k].round(4).tolist(),
                          relevance=data[f"{kind}_relevance"][row].astype(np.float32), thumbnail=data[f"{kind}_thumbnail"][row],
                          score=None if np.isnan(score) else score, timestamp=1.8e9 + first_id + k, model="m", version="1",
                          request_id=f"{kind}-{first_id + k}", latent=data[f"{kind}_latent"][row]))
    return out


def windows(data: dict, share: float, count: int, rng, first_id: int, size: int = WINDOW):
    """``count`` windows of ``size`` with ``share`` of watermarked views, drawn without replacement within a window."""
    n = len(data["clean_logits"])
    for w in range(count):
        marked = int(round(share * size))
        clean_rows = rng.choice(n, size - marked, replace=False)
        marked_rows = rng.choice(n, marked, replace=False)
        mixed = records(data, "clean", clean_rows, first_id + w * size) + records(data, "marked", marked_rows, first_id + w * size + 10**6)
        yield [mixed[i] for i in rng.permutation(len(mixed))]


def monitored(state: Path, scratch: Path, size: int = WINDOW):
    """A Monitor on a copy of a reference state folder (its calibration kept in the original)."""
    from unhans.monitor.detector import DriftDetector
    from unhans.monitor.metrics import MonitorMetrics
    from unhans.monitor.service import CALIBRATION_FILE, Monitor

    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(state, scratch)
    monitor = Monitor(scratch, str(scratch / "no-sink"), DriftDetector(), size, metrics=MonitorMetrics("m", "1"))
    monitor.calibrate(show_progress=False)
    if not (state / CALIBRATION_FILE).is_file():
        shutil.copyfile(scratch / CALIBRATION_FILE, state / CALIBRATION_FILE)
    return monitor


def run_windows(monitor, batches) -> list[dict]:
    from unhans.handlers.sink import Position
    from unhans.monitor.service import LEDGER_FILE, Window

    for batch in batches:
        monitor.analyse(Window(batch, Position(), "count"))
    return [json.loads(line) for line in (monitor.state_dir / LEDGER_FILE).read_text().splitlines()]


def onset(monitor, data, share: float, rng) -> tuple[int, list[dict]]:
    ledger = run_windows(monitor, windows(data, share, ONSET_WINDOWS, rng, 5 * 10**7))
    alerts = [i for i, w in enumerate(ledger) if w["alerts"]]
    return (alerts[0] + 1 if alerts else 0), ledger


def saturation(cache: Path, archive: Path, files: list[Path]) -> float:
    """Share of answered requests the sampler recorded within a minute after 60 s of saturating traffic."""
    from concurrent.futures import ThreadPoolExecutor

    from unhans.core.serving import FILES, ServingConfig, unpacked
    from unhans.handlers.sink import ShardReader
    from unhans.torchserve import LocalTorchServe

    work = cache / "ts-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    store = cache / "ts-store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    shutil.copyfile(archive, store / archive.name)
    shutil.copyfile(archive.parent / "config.properties", store / "config.properties")
    with unpacked(archive) as folder:
        sink = ServingConfig.from_yaml(folder / FILES.config).sample.sink
    bodies = [f.read_bytes() for f in files[:64]]
    answered = 0
    with LocalTorchServe(store, [archive.stem], work, ready_timeout=300, keep_alive=True) as server:
        deadline = time.monotonic() + 60

        def client(k: int) -> int:
            done = 0
            while time.monotonic() < deadline:
                status, _ = server.post(f"/predictions/{archive.stem}", bodies[(k + done) % len(bodies)], "image/jpeg")
                done += status == 200
            return done

        with ThreadPoolExecutor(8) as threads:
            answered = sum(threads.map(client, range(8)))
        time.sleep(60)
        # without a configured sink, each worker writes to unhans-sink in its own working directory (under work/models)
        sinks = [sink] if sink else [str(p) for p in work.rglob("unhans-sink")]
        recorded = sum(1 for url in sinks for _ in ShardReader(url, archive.stem, include_open=True).read())
    return recorded / max(answered, 1)


def screenshot(page: Path, out: Path) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return "chromium missing"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={out}", "--window-size=1200,2400",
                    page.as_uri()], capture_output=True, timeout=120)
    return str(out) if out.is_file() else "failed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--photos", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "imagenet-sample")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/unhans-monitor-real"))
    parser.add_argument("--views", type=int, default=6)
    parser.add_argument("--no-http", action="store_true", help="skip the real server (sampled_share_at_saturation)")
    args = parser.parse_args()
    files = sorted(args.photos.glob("*.JPEG"))
    if len(files) < 100:
        print(f"bench/monitor_real.py: {args.photos} holds {len(files)} photos; it needs the shared ImageNet sample "
              "(../shared/imagenet-sample, 500 photos)", file=sys.stderr)
        sys.exit(2)
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    reference_files, traffic_files = files[0::2], files[1::2]
    reference_dir = cache / "reference-photos"
    if not reference_dir.is_dir():
        reference_dir.mkdir()
        for f in reference_files:
            os.symlink(f.resolve(), reference_dir / f.name)
    built = archives(cache, reference_files, args.photos / "classes.txt")
    figures = {"reference_photos_used": len(reference_files), "traffic_photos": len(traffic_files), "traffic_views_per_photo": args.views}
    state, figures["reference_peak_rss_mb"] = reference(cache, built["watch"], reference_dir, "watch")
    data = pool(cache, built["watch"], traffic_files, args.views, "watch")

    rng = np.random.default_rng(0)
    monitor = monitored(state, cache / "run-clean")
    clean = run_windows(monitor, windows(data, 0.0, CLEAN_WINDOWS, rng, 0))
    figures["clean_windows"] = len(clean)
    figures["false_alerts_clean_windows"] = sum(bool(w["alerts"]) for w in clean)
    figures["traffic_share_analysed"] = float(np.mean([w["analysed"] / w["n"] for w in clean]))
    figures["window_seconds_1000"] = statistics.median(w["seconds"] for w in clean)
    drift = [w["cross_class"]["drift_score"] for w in clean if w["cross_class"] and "drift_score" in w["cross_class"]]
    figures["clean_drift_score_max"] = max(drift) if drift else None
    figures["threshold"] = clean[0]["cross_class"]["threshold"] if clean[0]["cross_class"] else None
    evidence = None
    for share, key in ((0.1, "10pct"), (0.02, "2pct"), (0.3, "30pct"), (0.5, "50pct"), (1.0, "100pct")):
        found, ledger = onset(monitored(state, cache / f"run-{key}"), data, share, rng)
        figures[f"windows_to_alert_watermark_{key}"] = found
        figures[f"drift_scores_watermark_{key}"] = [round(w["cross_class"]["drift_score"], 1) for w in ledger if w["cross_class"]]
        if found and evidence is None:
            evidence = cache / f"run-{key}" / ledger[found - 1]["evidence"]
    figures["evidence_screenshot"] = screenshot(evidence, cache / "evidence.png") if evidence else "no alert"

    patched_state, _ = reference(cache, built["patched"], reference_dir, "patched")
    patched = pool(cache, built["patched"], traffic_files[:125], 4, "patched")  # 500 views: windows of 400
    ledger = run_windows(monitored(patched_state, cache / "run-patched", PATCHED_WINDOW),
                         windows(patched, 0.1, 3, rng, 9 * 10**7, PATCHED_WINDOW))
    figures["corrected_known_artifact_warnings"] = sum(bool(w["known_artifact_alerts"]) for w in ledger)
    figures["corrected_new_strategy_alerts"] = sum(bool(w["alerts"]) for w in ledger)
    figures["watermark_alert_on_corrected_archive"] = figures["corrected_known_artifact_warnings"] > 0 and figures["corrected_new_strategy_alerts"] == 0
    if not args.no_http:
        figures["sampled_share_at_saturation"] = saturation(cache, built["watch"], traffic_files)
    report("monitor_real: EfficientNet-Lite0, 250 + 250 real ImageNet photos, ImageNet-W watermark in served traffic", figures, TARGETS, args.json)


if __name__ == "__main__":
    main()
