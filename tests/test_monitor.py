"""monitor/: drift of explanations on replayed traffic of a real backdoored model, restarts, bad records, the alert
rules under promtool, and a real Prometheus that scrapes a running monitor until the alert fires."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from unhans.core.attribution import LRP
from unhans.core.poison import attacked
from unhans.handlers.sink import Record, ShardWriter
from unhans.monitor.detector import DriftDetector
from unhans.monitor.metrics import MonitorMetrics, serve
from unhans.monitor.reference import REFERENCE_FILE, Reference, explain_with_archive
from unhans.monitor.replay import mixed_windows, replay
from unhans.monitor.service import CALIBRATION_FILE, LEDGER_FILE, STATE_FILE, Monitor

RULES = Path(__file__).resolve().parents[1] / "monitor" / "prometheus"
MODEL, VERSION, WINDOW = "vgg", "1.0", 400
UNHANS = str(Path(sys.executable).with_name("unhans"))


def _detector():
    return DriftDetector(n_resamples=40)


@pytest.fixture(scope="module")
def traffic(backdoored_vgg):
    """LRP of real MNIST-5k images by the backdoored model: a trusted reference half and a traffic half of clean
    images, and attacked images (the patch pasted into other classes), which the reference never saw."""
    model, train, test = backdoored_vgg["model"], backdoored_vgg["train"], backdoored_vgg["test"]
    clean = np.concatenate([train.images[~train.has_artifact][:1600], test.images])
    order = np.random.default_rng(0).permutation(len(clean))
    lrp = LRP(model)
    explained = lrp.explain(clean)
    attack = attacked(test, backdoored_vgg["artifact"], train.target).images[:300]
    explained_attack = lrp.explain(attack)
    reference_rows, traffic_rows = order[:1500], order[1500:]
    reference = Reference.from_relevance(explained.relevance[reference_rows], explained.logits[reference_rows].argmax(1),
                                         train.classes, MODEL, VERSION)
    return {"reference": reference, "images": clean[traffic_rows], "relevance": explained.relevance[traffic_rows],
            "logits": explained.logits[traffic_rows], "attack_images": attack, "attack_relevance": explained_attack.relevance,
            "attack_logits": explained_attack.logits, "target": train.target}


@pytest.fixture(scope="module")
def calibrated(traffic, tmp_path_factory):
    """A state folder with the reference and a calibration for windows of WINDOW records."""
    state = tmp_path_factory.mktemp("calibrated")
    traffic["reference"].save(state / REFERENCE_FILE)
    Monitor(state, str(state / "no-sink"), _detector(), WINDOW).calibrate(show_progress=False)
    return state


def _state(calibrated, tmp_path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    for name in (REFERENCE_FILE, CALIBRATION_FILE):
        shutil.copyfile(calibrated / name, state / name)
    return state


def _windows(traffic, windows: int, artifact_share: float, seed: int, first_id: int = 0) -> dict:
    """``windows`` windows of WINDOW records, ``artifact_share`` of each attacked, with unique request ids."""
    keys = ("images", "relevance", "logits")
    return mixed_windows({k: traffic[k] for k in keys}, {k: traffic["attack_" + k] for k in keys}, windows, WINDOW,
                         artifact_share, np.random.default_rng(seed), first_id)


def _replay(sink, batch, writers=1):
    return replay(str(sink), MODEL, VERSION, batch["images"], batch["relevance"], batch["logits"], request_ids=batch["ids"], writers=writers)


def _concat(*batches):
    return {k: sum((b[k] for b in batches), []) if k == "ids" else np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _ledger(state):
    return [json.loads(line) for line in (state / LEDGER_FILE).read_text().splitlines()]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_new_strategy_alerts_with_evidence_and_clean_traffic_does_not(traffic, calibrated, tmp_path):
    state = _state(calibrated, tmp_path)
    clean, onset = _windows(traffic, 3, 0.0, seed=1), _windows(traffic, 2, 0.05, seed=2, first_id=10**6)
    _replay(tmp_path / "sink", _concat(clean, onset))
    metrics = MonitorMetrics(MODEL, VERSION)
    monitor = Monitor(state, str(tmp_path / "sink"), _detector(), WINDOW, metrics=metrics)
    assert monitor.run(follow=False) == 5
    ledger = _ledger(state)
    assert [w["alerts"] for w in ledger] == [[], [], [], ["0"], ["0"]]  # the patch sends its images to class 0
    target = next(c for c in ledger[3]["classes"] if c["class_index"] == traffic["target"])
    assert target["drift_score"] > 2 * target["threshold"] and target["n_clusters"] >= 2
    value = lambda name, **labels: metrics.registry.get_sample_value(name, {"model": MODEL, "version": VERSION, **labels})
    assert value("unhans_monitor_windows_total") == 5 and value("unhans_monitor_samples_total") == 5 * WINDOW
    assert value("unhans_monitor_alert", **{"class": "0", "kind": "new_strategy"}) == 1
    assert value("unhans_monitor_alert", **{"class": "3", "kind": "new_strategy"}) == 0
    assert value("unhans_monitor_drift_score", **{"class": "0"}) > value("unhans_monitor_drift_threshold", **{"class": "0"})
    assert value("unhans_monitor_analysis_seconds_count") == 5

    page = state / ledger[3]["evidence"]
    text = page.read_text()
    assert "class 0" in text and "cluster 1" in text and "reference: mean heatmap" in text
    strips = sorted(page.parent.glob("class-0-cluster-*.png"))
    assert len(strips) == target["n_clusters"]
    from PIL import Image

    # the artifact cluster's mean heatmap lights up where the patch is (bottom-right corner), the other's does not
    hot = [np.asarray(Image.open(strip).convert("RGB"), np.float32)[:112, :112] for strip in strips]
    corner = [float((h[84:, 84:, 0] - h[84:, 84:, 2]).mean()) for h in hot]
    assert max(corner) > 40 and min(corner) < max(corner) / 2, corner

    server = serve(metrics, state / "evidence", port=0)
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        status, body = _get(f"{base}/metrics")
        assert status == 200 and b'unhans_monitor_alert{class="0",kind="new_strategy",model="vgg",version="1.0"} 1.0' in body
        status, body = _get(f"{base}/evidence/latest/class-0.html")  # the link the alert rule's annotation carries
        assert status == 200 and b"window-000004/index.html#class-0" in body
        assert _get(f"{base}/evidence/window-000004/index.html")[0] == 200
        assert _get(f"{base}/evidence/../state.json")[0] == 404
    finally:
        server.shutdown()


def test_bad_records_are_skipped_and_counted_never_alerted_on(traffic, calibrated, tmp_path):
    state, sink = _state(calibrated, tmp_path), tmp_path / "sink"
    batch = _windows(traffic, 1, 0.0, seed=3)
    _replay(sink, batch)
    good = dict(prediction=1, target=1, probabilities=[0.1] * 10, thumbnail=None, score=None, timestamp=1.8e9, model=MODEL,
                version=VERSION, request_id="bad")
    with ShardWriter(str(sink), MODEL, VERSION, "odd") as writer:
        writer.append(Record(relevance=None, **good))
        writer.append(Record(relevance=np.ones((14, 14)), **good))  # another model's map size
        writer.append(Record(relevance=np.full((28, 28), np.nan), **good))
        writer.append(Record(relevance=np.zeros((28, 28)), **good))
        writer.append(Record(relevance=np.eye(28), **{**good, "prediction": 12}))
    with ShardWriter(str(sink), MODEL, "2.0", "newer") as writer:  # shards of another version
        writer.append(Record(relevance=np.eye(28), **{**good, "version": "2.0"}))
    shard = next((sink / MODEL / VERSION).glob("replay-0-*.shard"))
    data = bytearray(shard.read_bytes())
    data[5000:5010] = b"\x00" * 10  # corrupt one record in the middle
    shard.write_bytes(bytes(data[:-100]))  # and tear the last one
    metrics = MonitorMetrics(MODEL, VERSION)
    monitor = Monitor(state, str(sink), _detector(), WINDOW - 4, metrics=metrics)  # the surviving records make one window
    assert monitor.run(follow=False) == 1
    skipped = lambda reason: metrics.registry.get_sample_value("unhans_monitor_records_skipped_total",
                                                               {"model": MODEL, "version": VERSION, "reason": reason})
    for reason in ("no_relevance", "wrong_shape", "not_finite", "constant_map", "unknown_class", "torn", "corrupt"):
        assert skipped(reason) == 1, reason
    assert metrics.registry.get_sample_value("unhans_monitor_other_version_shards", {"model": MODEL, "version": VERSION}) == 1
    assert _ledger(state)[0]["alerts"] == []


def test_small_classes_and_empty_windows_are_counted(traffic, calibrated, tmp_path):
    state, sink = _state(calibrated, tmp_path), tmp_path / "sink"
    batch = _windows(traffic, 1, 0.0, seed=4)
    predicted = batch["logits"].argmax(1)
    keep = np.concatenate([np.flatnonzero(predicted == c)[:20] for c in range(10) if c != 5])  # too few for SpRAy; no 5
    _replay(sink, {k: [batch[k][i] for i in keep] if k == "ids" else batch[k][keep] for k in batch})
    metrics = MonitorMetrics(MODEL, VERSION)
    Monitor(state, str(sink), _detector(), len(keep), metrics=metrics).run(follow=False)
    classes = _ledger(state)[0]["classes"]
    assert all("skipped" in c for c in classes) and classes[5]["skipped"] == "no samples"
    assert metrics.registry.get_sample_value("unhans_monitor_classes_skipped_total", {
        "model": MODEL, "version": VERSION, "class": "1", "reason": "too_few_samples"}) == 1
    assert _ledger(state)[0]["alerts"] == []


def test_sigkill_and_restart_lose_and_double_count_nothing(traffic, calibrated, tmp_path):
    state, sink = _state(calibrated, tmp_path), tmp_path / "sink"
    written = _replay(sink, _windows(traffic, 6, 0.0, seed=5), writers=2)
    command = [UNHANS, "monitor", "run", "--state", str(state), "--sink", str(sink), "--window-size", str(WINDOW),
               "--resamples", "40", "--port", "0", "--exit-when-idle"]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (state / STATE_FILE).is_file() or json.loads((state / STATE_FILE).read_text())["window_index"] < 2:
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read() if child.poll() is not None else "timeout"
        time.sleep(0.02)
    time.sleep(0.3)  # inside the next window
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ledger = _ledger(state)
    analysed = Counter(i for w in ledger for i in w["request_ids"])
    assert [w["index"] for w in ledger] == list(range(6))
    assert sorted(analysed) == sorted(written) and max(analysed.values()) == 1


def test_reference_is_explained_by_the_served_archive(served_archive, backdoored_vgg):
    root, corrected = served_archive
    images = backdoored_vgg["test"].images[:40]
    explained = explain_with_archive(root / "store" / "vgg.mar", images)
    expected = LRP(corrected).explain(images)
    assert explained["model"] == "vgg" and explained["version"] == "1.0" and explained["classes"][:2] == ["0", "1"]
    assert np.array_equal(explained["predictions"], expected.logits.argmax(1))
    scale = np.abs(expected.relevance).max()
    assert np.abs(explained["relevance"] - expected.relevance.sum(1)).max() <= 2e-3 * scale
    assert explained["scores"].shape == (40,)


def test_cli_errors_name_the_problem(tmp_path):
    done = subprocess.run([UNHANS, "monitor", "run", "--state", str(tmp_path), "--sink", str(tmp_path / "sink")], capture_output=True, text=True)
    assert done.returncode == 2 and "reference.npz: does not exist" in done.stderr and "unhans monitor reference" in done.stderr
    (tmp_path / "junk.mar").write_bytes(b"not a zip")
    done = subprocess.run([UNHANS, "monitor", "reference", "--archive", str(tmp_path / "junk.mar"), "--data", "digits",
                           "--state", str(tmp_path / "s")], capture_output=True, text=True)
    assert done.returncode == 2 and "is not a TorchServe archive" in done.stderr and "Traceback" not in done.stderr


def test_trusted_photos_are_read_through_the_archives_input_contract(tmp_path):
    """monitor reference --data FOLDER: photos of any size become the model's inputs by the archive's own contract
    (resize, crop, mean, std), as the handler makes them of served photos."""
    from PIL import Image

    from unhans.core.contract import InputContract
    from unhans.core.serving import FILES, ServingConfig
    from unhans.monitor.cli import _trusted_images

    contract = InputContract(3, 8, 8, mean=[0.5], std=[0.25], resize=10)
    archive = tmp_path / "archive"
    (archive / FILES.manifest).parent.mkdir(parents=True)
    (archive / FILES.manifest).write_text(json.dumps({"model": {"modelName": "m", "serializedFile": "m.onnx"}}))
    (archive / FILES.config).write_text(ServingConfig(contract=contract, layer="features").to_yaml())
    rng = np.random.default_rng(0)
    for c, side in enumerate(((20, 14), (9, 31))):
        (tmp_path / "photos" / str(c)).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (*side, 3), dtype=np.uint8)).save(tmp_path / "photos" / str(c) / "a.png")
    images = _trusted_images(str(tmp_path / "photos"), str(archive))
    with Image.open(tmp_path / "photos" / "1" / "a.png") as photo:
        expected = contract.normalise(contract.pixels(photo))
    assert images.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(images[1], expected, atol=1e-6)


def test_alert_rules_pass_promtool():
    for command in (["promtool", "check", "rules", "alerts.yml"], ["promtool", "test", "rules", "alerts_test.yml"],
                    ["promtool", "check", "config", "prometheus.yml"]):
        done = subprocess.run(command, cwd=RULES, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_queries_only_exported_metrics():
    from unhans.core.serving import METRICS

    exported = set(METRICS)
    for family in MonitorMetrics(MODEL, VERSION).registry.collect():  # counters are collected without their _total
        exported |= {family.name, f"{family.name}_total"}
    dashboard = json.loads((RULES / "grafana-dashboard.json").read_text())
    queried = {re.sub(r"_bucket$", "", name) for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"unhans_[a-z_]+", target["expr"])}
    assert len(queried) > 10 and queried <= exported, queried - exported


@pytest.mark.integration
def test_real_prometheus_scrapes_the_monitor_and_the_alert_fires(traffic, calibrated, tmp_path):
    state, sink = _state(calibrated, tmp_path), tmp_path / "sink"
    _replay(sink, _concat(_windows(traffic, 1, 0.0, seed=6), _windows(traffic, 1, 0.05, seed=7, first_id=10**6)))
    monitor_port, prometheus_port = _free_port(), _free_port()
    monitor = subprocess.Popen([UNHANS, "monitor", "run", "--state", str(state), "--sink", str(sink), "--window-size", str(WINDOW),
                                "--resamples", "40", "--port", str(monitor_port)], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "monitor.log", "w"))
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(RULES / "alerts.yml")],
        "scrape_configs": [{"job_name": "unhans-monitor", "static_configs": [{"targets": [f"127.0.0.1:{monitor_port}"]}]}]}))
    prometheus = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{prometheus_port}"], stdout=subprocess.DEVNULL,
                                  stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        deadline, firing = time.monotonic() + 240, []
        while not firing and time.monotonic() < deadline:
            assert monitor.poll() is None, (tmp_path / "monitor.log").read_text()
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
            time.sleep(1)
            try:
                alerts = json.loads(_get(f"http://127.0.0.1:{prometheus_port}/api/v1/alerts")[1])["data"]["alerts"]
            except (OSError, ValueError, KeyError):
                continue
            firing = [a for a in alerts if a["labels"]["alertname"] == "UnhansNewCleverHansStrategy" and a["state"] == "firing"]
        assert firing, (tmp_path / "monitor.log").read_text()
        assert [a["labels"]["class"] for a in firing] == ["0"]
        status, page = _get(firing[0]["annotations"]["evidence"])  # the link in the alert leads to the pictures
        assert status == 200 and b"newest evidence for class 0" in page
    finally:
        for process in (monitor, prometheus):
            process.send_signal(signal.SIGTERM)
        for process in (monitor, prometheus):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    assert monitor.returncode == 0  # SIGTERM stops the monitor cleanly
