"""Benchmark: the monitor on replayed MNIST-5k traffic of a model with an artifact its reference never saw.

    python bench/monitor.py [--json PATH] [--run DIR] [--clean-windows 50] [--window-size 1000]

The served model is the backdoored VGG-style model of bench/training.py (5x5 patch, 10% of classes 1-9 relabelled
0), uncorrected. Its clean images (clean training rows and the test set) are split in half at random: one half,
explained with LRP, is the trusted reference; the other half is traffic. Records go through the handler's sink
format (one writer, so windows are exact): ``--clean-windows`` windows of clean traffic, then windows where 5% of
the traffic carries the patch (attacked test images). Figures:

* ``false_alerts_clean_windows``: clean windows that raised a new-strategy alert, per class or across classes (target 0);
  ``crossclass_false_alerts_clean_windows`` / ``crossclass_windows_to_alert``: the cross-class test's share of it
  (records carry the relevance per channel at the model's monitor layer, as an archive's sampler writes them);
* ``windows_to_alert``: windows after the onset until the first alert, 1 = the first window with the artifact (<= 2);
* ``window_seconds_5000``: analysing one window of 5,000 records, calibration done (<= 10);
* ``samples_lost_after_restart`` / ``samples_double_counted_after_restart``: ``unhans monitor run`` killed with
  SIGKILL twice mid-stream on a two-writer sink and restarted, against every request id written (0 each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from common import report

from unhans.core.artifacts import Patch
from unhans.core.attribution import LRP
from unhans.core.layers import middle_spatial_layer
from unhans.core.poison import attacked
from unhans.core.training import TrainSpec, load_run, train_run
from unhans.handlers.sink import ShardReader
from unhans.monitor.detector import DriftDetector
from unhans.monitor.reference import REFERENCE_FILE, Reference
from unhans.monitor.replay import mixed_windows, replay
from unhans.monitor.service import ALL_CLASSES, CALIBRATION_FILE, LEDGER_FILE, STATE_FILE, Monitor, Window

TARGETS = {"false_alerts_clean_windows": "0", "windows_to_alert": "<= 2", "window_seconds_5000": "<= 10",
           "samples_lost_after_restart": "0", "samples_double_counted_after_restart": "0"}
MODEL, VERSION = "bench", "1.0"


def explain(run: Path, seed: int = 0) -> dict:
    model, train, test, attack_set, artifact = load_run(run)
    clean = np.concatenate([train.images[~train.has_artifact], test.images])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(clean))
    layer = middle_spatial_layer(model, torch.from_numpy(clean[:2]))  # what an archive of the model records per channel
    lrp = LRP(model, layers=(layer,))
    explained = lrp.explain(clean, batch_size=256, show_progress=True, description="relevance of clean images")
    attack = attacked(test, artifact, train.target, seed=seed)  # the images of every other class, tagged
    explained_attack = lrp.explain(attack.images, batch_size=256, show_progress=True, description="relevance of attacked images")
    half = len(order) // 2
    return {"classes": train.classes, "target": train.target, "images": clean, "relevance": explained.relevance.sum(1),
            "logits": explained.logits, "latent": explained.layer_relevance[layer].sum(axis=(2, 3)), "layer": layer,
            "reference": order[:half], "traffic": order[half:], "attack_images": attack.images,
            "attack_relevance": explained_attack.relevance.sum(1), "attack_logits": explained_attack.logits,
            "attack_latent": explained_attack.layer_relevance[layer].sum(axis=(2, 3))}


KEYS = ("images", "relevance", "logits", "latent")


def traffic(data: dict, windows: int, window_size: int, artifact_share: float, rng, start_id: int) -> dict:
    """``windows`` windows of the traffic half, ``artifact_share`` of each attacked; a window larger than the pool
    repeats images (the 5,000-record timing window: 2,320 clean images)."""
    clean = {key: data[key][data["traffic"]] for key in KEYS}
    attack = {key: data["attack_" + key] for key in KEYS}
    return mixed_windows(clean, attack, windows, window_size, artifact_share, rng, start_id)


def write(sink: str, batch: dict, writers: int, timestamps=None) -> list[str]:
    return replay(sink, MODEL, VERSION, batch["images"], batch["relevance"], batch["logits"], request_ids=batch["ids"],
                  timestamps=timestamps, writers=writers, latent=batch["latent"])


def detection(data: dict, state: Path, sink: Path, clean_windows: int, window_size: int, detector: DriftDetector) -> dict:
    rng = np.random.default_rng(1)
    clean = traffic(data, clean_windows, window_size, 0.0, rng, 0)
    onset = traffic(data, 3, window_size, 0.05, rng, len(clean["ids"]))
    write(str(sink), {k: np.concatenate([clean[k], onset[k]]) if k != "ids" else clean[k] + onset[k] for k in clean}, writers=1)
    monitor = Monitor(state, str(sink), detector, window_size)
    started = time.perf_counter()
    monitor.calibrate(show_progress=False)
    calibration_seconds = time.perf_counter() - started
    monitor.run(follow=False)
    ledger = [json.loads(line) for line in (state / LEDGER_FILE).read_text().splitlines()]
    false_alerts = sum(bool(w["alerts"]) for w in ledger[:clean_windows])
    alerting = [w["index"] - clean_windows + 1 for w in ledger[clean_windows:] if w["alerts"]]
    target_class = data["classes"][data["target"]]
    ratios = [c["drift_score"] / c["threshold"] for w in ledger[:clean_windows] for c in w["classes"] if c.get("drift_score") is not None]
    first = next((w for w in ledger[clean_windows:] if w["alerts"]), None)
    return {"false_alerts_clean_windows": false_alerts, "clean_windows": clean_windows,
            "false_alarm_rate_stated": detector.false_alarm_rate,
            "max_clean_drift_over_threshold": round(max(ratios), 3),
            "windows_to_alert": alerting[0] if alerting else None,
            "alerted_class_is_target": bool(first and target_class in first["alerts"]),
            "crossclass_false_alerts_clean_windows": sum(ALL_CLASSES in w["alerts"] for w in ledger[:clean_windows]),
            "crossclass_windows_to_alert": next((w["index"] - clean_windows + 1 for w in ledger[clean_windows:] if ALL_CLASSES in w["alerts"]), None),
            "onset_drift_over_threshold": round(next(c["drift_score"] / c["threshold"] for c in ledger[clean_windows]["classes"]
                                                     if c["class_index"] == data["target"]), 2),
            "calibration_seconds": round(calibration_seconds, 1),
            "window_seconds_1000": round(float(np.median([w["seconds"] for w in ledger])), 2)}


def big_window(data: dict, state: Path, detector: DriftDetector) -> dict:
    """One window of 5,000 records (5% attacked) analysed after calibrating its class sizes."""
    rng = np.random.default_rng(2)
    batch = traffic(data, 1, 5000, 0.05, rng, 10**7)
    sink = state.parent / "sink-5000"
    write(str(sink), batch, writers=2)
    monitor = Monitor(state, str(sink), detector, 5000)
    monitor.calibrate(show_progress=False)
    reader = ShardReader(str(sink), MODEL, VERSION)
    records = [record for _, record in reader.read()]
    started = time.perf_counter()
    results = monitor.analyse(Window(records, reader.position, "count"))
    return {"window_seconds_5000": round(time.perf_counter() - started, 2),
            "window_5000_alerts": [data["classes"][r.class_index] for r in results if r.alert]}


def restart(data: dict, reference_state: Path, work: Path, window_size: int) -> dict:
    """Kill ``unhans monitor run`` twice with SIGKILL mid-stream, restart it, and compare what it analysed with the sink."""
    state, sink = work / "restart-state", work / "restart-sink"
    state.mkdir()
    for name in (REFERENCE_FILE, CALIBRATION_FILE):
        shutil.copyfile(reference_state / name, state / name)
    rng = np.random.default_rng(3)
    windows = 12
    batch = traffic(data, windows, window_size, 0.0, rng, 10**8)
    written = write(str(sink), batch, writers=2)
    command = [str(Path(sys.executable).with_name("unhans")), "monitor", "run", "--state", str(state), "--sink", str(sink),
               "--window-size", str(window_size), "--port", "0", "--exit-when-idle"]
    kills = 0
    for kill_after in (2, 5, None):  # committed windows before each SIGKILL
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill_after is None:
            child.wait(timeout=900)
            break
        while child.poll() is None:
            done = json.loads((state / STATE_FILE).read_text())["window_index"] if (state / STATE_FILE).is_file() else 0
            if done >= kill_after:
                time.sleep(float(np.random.default_rng(kill_after).uniform(0.2, 1.5)))  # somewhere inside the next window
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
                kills += 1
                break
            time.sleep(0.05)
    ledger = [json.loads(line) for line in (state / LEDGER_FILE).read_text().splitlines()]
    analysed = Counter(i for w in ledger for i in w["request_ids"])
    return {"samples_lost_after_restart": sum(1 for i in written if i not in analysed),
            "samples_double_counted_after_restart": sum(c - 1 for c in analysed.values() if c > 1),
            "restart_kills": kills, "restart_windows": len(ledger), "restart_records": len(written)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures as one JSON object here")
    parser.add_argument("--run", type=Path, help="run folder of the backdoored VGG (trained here if missing)")
    parser.add_argument("--clean-windows", type=int, default=50)
    parser.add_argument("--window-size", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="unhans-bench-monitor-") as scratch:
        work = Path(scratch)
        run = args.run or work / "run"
        if not (run / "weights.pt").is_file():
            train_run(TrainSpec(data="mnist", architecture="vgg", mode="backdoor", fraction=0.1), Patch(), run)
        data = explain(run)
        state = work / "state"
        state.mkdir()
        reference = Reference.from_relevance(data["relevance"][data["reference"]], data["logits"][data["reference"]].argmax(1),
                                             data["classes"], MODEL, VERSION, latent=data["latent"][data["reference"]],
                                             monitor_layer=data["layer"])
        reference.save(state / REFERENCE_FILE)
        detector = DriftDetector()
        figures = detection(data, state, work / "sink", args.clean_windows, args.window_size, detector)
        figures.update(big_window(data, state, detector))
        figures.update(restart(data, state, work, args.window_size))
        figures["reference_samples"] = len(data["reference"])
    report("unhans monitor on replayed MNIST-5k traffic (backdoored VGG, patch unseen by the reference)", figures, TARGETS, args.json)


if __name__ == "__main__":
    main()
