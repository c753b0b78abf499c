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
import torch

from unhans.core.attribution import LRP
from unhans.core.layers import middle_spatial_layer
from unhans.core.poison import attacked
from unhans.export.archive import build_archive
from unhans.handlers.sink import Record, ShardWriter
from unhans.monitor.carry import CARRY_WINDOWS
from unhans.monitor.detector import DriftDetector
from unhans.monitor.metrics import MonitorMetrics, serve
from unhans.core.spray import preprocess
from unhans.monitor.reference import REFERENCE_FILE, Reference, explain_with_archive, in_batches
from unhans.monitor.replay import mixed_windows, replay
from unhans.monitor.service import ALL_CLASSES, CALIBRATION_FILE, LEDGER_FILE, STATE_FILE, Monitor

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
    layer = middle_spatial_layer(model, torch.from_numpy(clean[:2]))  # the monitor layer an archive of it records
    lrp = LRP(model, layers=(layer,))
    explained = lrp.explain(clean)
    attack = attacked(test, backdoored_vgg["artifact"], train.target).images[:300]
    explained_attack = lrp.explain(attack)
    reference_rows, traffic_rows = order[:1500], order[1500:]
    latent = explained.layer_relevance[layer].sum(axis=(2, 3))
    reference = Reference.from_relevance(explained.relevance[reference_rows], explained.logits[reference_rows].argmax(1),
                                         train.classes, MODEL, VERSION, latent=latent[reference_rows], monitor_layer=layer)
    return {"reference": reference, "images": clean[traffic_rows], "relevance": explained.relevance[traffic_rows],
            "logits": explained.logits[traffic_rows], "latent": latent[traffic_rows], "attack_images": attack,
            "attack_relevance": explained_attack.relevance, "attack_logits": explained_attack.logits,
            "attack_latent": explained_attack.layer_relevance[layer].sum(axis=(2, 3)), "target": train.target}


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
    keys = ("images", "relevance", "logits", "latent")
    return mixed_windows({k: traffic[k] for k in keys}, {k: traffic["attack_" + k] for k in keys}, windows, WINDOW,
                         artifact_share, np.random.default_rng(seed), first_id)


def _replay(sink, batch, writers=1):
    return replay(str(sink), MODEL, VERSION, batch["images"], batch["relevance"], batch["logits"], request_ids=batch["ids"], writers=writers,
                  latent=batch["latent"])


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
    # the patch sends its images to class 0; the cross-class test sees the new strategy too
    assert [w["alerts"] for w in ledger] == [[], [], [], ["0", ALL_CLASSES], ["0", ALL_CLASSES]]
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
    data[5000:5010] = b"\xff" * 10  # corrupt one record in the middle (0xff: no part of a record is all 0xff)
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
    reference = explain_with_archive(root / "store" / "vgg.mar", in_batches(images, 16))
    layer = reference.monitor_layer
    expected = LRP(corrected, layers=(layer,)).explain(images)
    assert reference.model == "vgg" and reference.version == "1.0" and reference.classes[:2] == ["0", "1"]
    assert np.array_equal(reference.predictions, expected.logits.argmax(1))
    want = preprocess(expected.relevance.sum(1), reference.pooling)
    assert np.abs(reference.features - want).max() <= 2e-3 * np.abs(want).max()
    assert reference.scores.shape == (40,) and np.array_equal(reference.groups, np.arange(40))
    latent = expected.layer_relevance[layer].sum(axis=(2, 3))  # relevance per channel at the monitor layer
    assert reference.latent.shape == latent.shape and np.abs(reference.latent - latent).max() <= 2e-3 * np.abs(latent).max()


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
    from unhans.monitor.cli import _trusted_batches

    contract = InputContract(3, 8, 8, mean=[0.5], std=[0.25], resize=10)
    archive = tmp_path / "archive"
    (archive / FILES.manifest).parent.mkdir(parents=True)
    (archive / FILES.manifest).write_text(json.dumps({"model": {"modelName": "m", "serializedFile": "m.onnx"}}))
    (archive / FILES.config).write_text(ServingConfig(contract=contract, layer="features").to_yaml())
    rng = np.random.default_rng(0)
    for c, side in enumerate(((20, 14), (9, 31))):
        (tmp_path / "photos" / str(c)).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (*side, 3), dtype=np.uint8)).save(tmp_path / "photos" / str(c) / "a.png")
    (tmp_path / "photos" / "broken.png").write_bytes(b"not a png")
    batches, total, skipped = _trusted_batches(str(tmp_path / "photos"), archive, augment=2, batch_size=4)
    images, groups = map(np.concatenate, zip(*batches))
    with Image.open(tmp_path / "photos" / "1" / "a.png") as photo:
        expected = contract.normalise(contract.pixels(photo))
    assert total == 9 and skipped == [1]  # 3 files, each plain and in 2 random views; the broken one skipped and counted
    assert images.shape == (6, 3, 8, 8) and groups.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(images[3], expected, atol=1e-6)  # a photo's first view is the handler's own
    assert not np.allclose(images[4], images[3])  # the others are random crops and mirrors of it


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
        while len(firing) < 2 and time.monotonic() < deadline:  # class 0's alert and the cross-class one
            assert monitor.poll() is None, (tmp_path / "monitor.log").read_text()
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
            time.sleep(1)
            try:
                alerts = json.loads(_get(f"http://127.0.0.1:{prometheus_port}/api/v1/alerts")[1])["data"]["alerts"]
            except (OSError, ValueError, KeyError):
                continue
            firing = [a for a in alerts if a["labels"]["alertname"] == "UnhansNewCleverHansStrategy" and a["state"] == "firing"]
        assert firing, (tmp_path / "monitor.log").read_text()
        assert sorted(a["labels"]["class"] for a in firing) == [ALL_CLASSES, "0"]
        for alert in firing:  # the link in each alert leads to its pictures
            status, page = _get(alert["annotations"]["evidence"])
            assert status == 200 and f"newest evidence for class {alert['labels']['class']}".encode() in page
    finally:
        for process in (monitor, prometheus):
            process.send_signal(signal.SIGTERM)
        for process in (monitor, prometheus):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    assert monitor.returncode == 0  # SIGTERM stops the monitor cleanly


def test_across_classes_a_shortcut_alerts_with_evidence_and_clean_traffic_does_not(traffic, calibrated, tmp_path):
    """The cross-class test (relevance per channel at the monitor layer, all classes together): clean windows stay
    quiet, the patch in 10% of the traffic alerts in its first window, with an evidence page of the served samples that
    carry the drift, most of them patched ones, and the metrics under class "(all)"."""
    state = _state(calibrated, tmp_path)
    clean, onset = _windows(traffic, 3, 0.0, seed=11), _windows(traffic, 1, 0.1, seed=12, first_id=10**6)
    _replay(tmp_path / "sink", _concat(clean, onset))
    metrics = MonitorMetrics(MODEL, VERSION)
    Monitor(state, str(tmp_path / "sink"), _detector(), WINDOW, metrics=metrics).run(follow=False)
    ledger = _ledger(state)
    assert [ALL_CLASSES in w["alerts"] for w in ledger] == [False, False, False, True], [w["cross_class"] for w in ledger]
    assert all(w["analysed"] == w["n"] for w in ledger[:3])  # every clean record entered a test
    cross = ledger[3]["cross_class"]
    assert cross["drift_score"] > cross["threshold"] and cross["n"] == WINDOW
    value = lambda name, **labels: metrics.registry.get_sample_value(name, {"model": MODEL, "version": VERSION, **labels})
    assert value("unhans_monitor_alert", **{"class": ALL_CLASSES, "kind": "new_strategy"}) == 1
    assert value("unhans_monitor_crossclass_evidence", statistic="shift") == cross["statistics"]["shift"]
    page = state / ledger[3]["evidence"]
    text = page.read_text()
    assert "a new strategy across classes" in text and "alerting since window 3" in text
    shown = re.findall(r"served photos \(requests ([^)]*)\)", text)[0].split(", ")
    assert sum(i.startswith(f"r{10**6}") or int(i[1:]) >= 10**6 for i in shown) >= len(shown) // 2  # mostly the patched requests
    assert (page.parent / "class-_all_-photos.png").is_file() and (state / "evidence" / "latest" / "class-_all_.html").is_file()


def test_a_request_repeated_verbatim_counts_once(traffic, calibrated, tmp_path):
    """n identical records are one sample to the cross-class test, not n: too few to test, and no alert."""
    state = _state(calibrated, tmp_path)
    batch = _windows(traffic, 1, 0.0, seed=13)
    same = {k: [v[0]] * WINDOW if k == "ids" else np.repeat(v[:1], WINDOW, axis=0) for k, v in batch.items()}
    same["ids"] = [f"again-{k}" for k in range(WINDOW)]
    _replay(tmp_path / "sink", same)
    Monitor(state, str(tmp_path / "sink"), _detector(), WINDOW).run(follow=False)
    cross = _ledger(state)[0]["cross_class"]
    assert cross["n"] == 1 and "at least" in cross["skipped"] and ALL_CLASSES not in _ledger(state)[0]["alerts"]


def test_a_model_is_archived_without_a_correction_and_its_traffic_is_recorded_for_the_monitor(backdoored_vgg, tmp_path):
    """'unhans archive' with no --onnx: the model as it is (predictions equal PyTorch's), no correction, no detector;
    sampled records carry the relevance per channel at the monitor layer, and the reference is built from it."""
    from unhans.core.serving import FILES, ServingConfig, unpacked
    from unhans.handlers.service import Row, Service
    from unhans.handlers.sink import ShardReader

    model, test = backdoored_vgg["model"], backdoored_vgg["test"]
    (tmp_path / "store").mkdir()
    sink = tmp_path / "sink"
    archive = build_archive(None, backdoored_vgg["run"], "watched", tmp_path / "store", sample_fraction=1.0, sink=str(sink),
                            sample_cpu_budget=1.0)
    images = test.images[:6]
    layer = middle_spatial_layer(model, torch.from_numpy(images[:2]))
    with unpacked(archive) as folder:
        assert not (folder / FILES.correction).exists() and ServingConfig.from_yaml(folder / FILES.config).monitor_layer == layer
        service = Service(folder)
        answers = service.answer([Row(json.dumps({"instances": images.tolist()}), "req")])
        deadline, records = time.monotonic() + 30, []
        while len(records) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
            records = [r for _, r in ShardReader(str(sink), "watched", include_open=True).read()]
        reference = explain_with_archive(folder, in_batches(images))
    expected = LRP(model, layers=(layer,)).explain(images)
    assert answers[0].status == 200 and [p["label"] for p in answers[0].body["predictions"]] == expected.logits.argmax(1).tolist()
    assert len(records) == 6 and all(r.score is None for r in records)
    latent = expected.layer_relevance[layer].sum(axis=(2, 3))
    got = np.stack([r.latent for r in sorted(records, key=lambda r: r.timestamp)])
    assert np.allclose(np.sort(got, axis=0), np.sort(latent, axis=0), atol=2e-3 * np.abs(latent).max())
    assert reference.monitor_layer == layer and reference.scores is None and reference.latent.shape == latent.shape


def test_a_real_model_is_watched_across_classes_before_it_is_patched(tmp_path):
    """EfficientNet-Lite0 (real ImageNet weights, 1,000 classes) archived as it is, its reference built by the CLI from
    13 of the 26 real photos that ship in packages (foolbox's ImageNet JPEGs, scikit-image's) in 5 views each, and
    traffic from the other 13 in 4 views: clean traffic stays quiet across classes, and ImageNet-W's watermark (the
    real overlay: 捷径捷径捷径, 50% white) on every request moves the window's explanations away from the reference
    though they spread over many classes. (13 photos are too few to alert at 0.001; bench/monitor_real.py measures
    the alert on 500 real ImageNet photos.)"""
    import importlib.util

    import skimage.data
    from click.testing import CliRunner
    from imagenet_w import AddWatermark
    from PIL import Image

    from unhans.cli import main
    from unhans.core.contract import InputContract
    from unhans.core.models.zoo import IMAGENET_MEAN, IMAGENET_STD, PHOTOS, write_efficientnet_lite0
    from unhans.core.serving import unpacked
    from unhans.handlers.relevance import Explainer

    spec = importlib.util.find_spec("foolbox")
    files = sorted(Path(spec.submodule_search_locations[0], "data").glob("imagenet_*.jpg"))
    for name in PHOTOS:
        files.append(tmp_path / f"{name}.jpg")
        Image.fromarray(getattr(skimage.data, name)()[..., :3]).save(files[-1], quality=92)
    (tmp_path / "trusted").mkdir()
    for file in files[0::2]:
        (tmp_path / "trusted" / file.name).symlink_to(file)
    model_file, weights = write_efficientnet_lite0(tmp_path / "lite0")
    (tmp_path / "store").mkdir()
    contract = InputContract(3, 224, 224, list(IMAGENET_MEAN), list(IMAGENET_STD), resize=256)
    imagenet = ["--size", "224", "--resize", "256", "--mean", ",".join(map(str, IMAGENET_MEAN)), "--std", ",".join(map(str, IMAGENET_STD))]
    runner = CliRunner()
    for command in (["archive", "--model", model_file, "--weights", weights, *imagenet, "--name", "lite0", "--model-store", tmp_path / "store"],
                    ["monitor", "reference", "--archive", tmp_path / "store" / "lite0.mar", "--data", tmp_path / "trusted",
                     "--augment", "4", "--state", tmp_path / "state"]):
        result = runner.invoke(main, [str(a) for a in command])
        assert result.exit_code == 0, result.output
    reference = Reference.load(tmp_path / "state" / REFERENCE_FILE)
    assert (len(reference.predictions), reference.photos, reference.monitor_layer, reference.latent.shape) == (65, 13, "_blocks.8", (65, 112))

    rng, mark = np.random.default_rng(0), AddWatermark(224)
    views = []
    for file in files[1::2]:
        with Image.open(file) as picture:
            views += [contract.view(picture.convert("RGB"), rng) for _ in range(4)]
    clean = np.stack(views)
    marked = np.stack([np.asarray(mark(Image.fromarray((v.transpose(1, 2, 0) * 255).round().astype(np.uint8))), np.float32) / 255
                       for v in views]).transpose(0, 3, 1, 2)
    with unpacked(tmp_path / "store" / "lite0.mar") as folder:
        explainer = Explainer(str(folder), threads=2)
        explained = [explainer.with_latent(contract.normalise(pixels)) for pixels in (clean, marked)]
    logits, heat, latent = (np.concatenate([e[k] for e in explained]) for k in (0, 1, 3))
    replay(str(tmp_path / "sink"), "lite0", "1.0", np.concatenate([clean, marked]), heat, logits, writers=1, latent=latent)
    Monitor(tmp_path / "state", str(tmp_path / "sink"), _detector(), len(clean)).run(follow=False)
    ledger = _ledger(tmp_path / "state")
    assert [w["alerts"] for w in ledger] == [[], []] and [w["analysed"] for w in ledger] == [len(clean)] * 2
    clean_window, marked_window = (w["cross_class"]["statistics"]["shift"] for w in ledger)
    assert marked_window > 1.2 * clean_window, (clean_window, marked_window)
    assert len(set(explained[1][0].argmax(1).tolist())) > 10  # the watermarked photos are predicted as many classes


def test_a_class_too_thin_in_one_window_is_tested_on_its_samples_over_windows(traffic, calibrated, tmp_path):
    """Windows of 20 samples a class (fewer than min_samples): each class is tested in the second window, on its
    samples of both, carried across a restart of the monitor; without carrying nothing is ever tested."""
    predicted, attacked = traffic["logits"].argmax(1), traffic["attack_logits"].argmax(1)
    target = traffic["target"]
    keys = ("images", "relevance", "logits", "latent")
    shortcut = np.flatnonzero(attacked == target)

    def window(part: int) -> dict:
        """20 samples of each class; half of the target class's samples carry the shortcut."""
        clean = np.concatenate([np.flatnonzero(predicted == c)[part * 20:(part + 1) * 20][:10 if c == target else 20] for c in range(10)])
        tagged = shortcut[part * 10:(part + 1) * 10]
        batch = {k: np.concatenate([traffic[k][clean], traffic["attack_" + k][tagged]]) for k in keys}
        batch["ids"] = [f"w{part}-{i}" for i in range(len(clean) + len(tagged))]
        return batch

    first, second = window(0), window(1)
    for carry_windows in (CARRY_WINDOWS, 0):
        (tmp_path / str(carry_windows)).mkdir()
        state, sink = _state(calibrated, tmp_path / str(carry_windows)), tmp_path / str(carry_windows) / "sink"
        for batch in (first, second):  # a new monitor for each window: what waits survives the restart
            _replay(sink, batch)
            Monitor(state, str(sink), _detector(), len(batch["ids"]), carry_windows=carry_windows).run(follow=False)
        ledger = _ledger(state)
        per_class = [[c for c in w["classes"] if "skipped" not in c] for w in ledger]
        assert per_class[0] == []  # nothing testable in the first window alone
        if carry_windows:
            assert ledger[1]["carried"] == len(first["ids"]) and len(per_class[1]) == 10 and all(c["n"] >= 30 for c in per_class[1])
            assert str(target) in ledger[1]["alerts"] and all(c["alert"] == (c["class_index"] == target) for c in per_class[1])
            assert json.loads((state / STATE_FILE).read_text())["carry"] is None and not list(state.glob("carry-*"))
        else:
            assert ledger[1]["carried"] == 0 and per_class[1] == [] and str(target) not in ledger[1]["alerts"]


def test_a_carry_that_did_not_change_is_not_written_again(tmp_path):
    from unhans.handlers.sink import Record
    from unhans.monitor.carry import Carry

    def record(i, c):
        return Record(prediction=c, target=c, probabilities=[0.5, 0.5], relevance=np.ones((4, 4), np.float32), thumbnail=None, score=None,
                      timestamp=float(i), model="m", version="1", request_id=f"r{i}")

    testable = lambda c: c == 1
    carry = Carry().update(0, [record(0, 1), record(1, 0)], set(), testable, max_windows=3, max_records=10)
    first = carry.save(tmp_path, 1)
    assert [r.request_id for r in carry.records] == ["r0"] and first["file"] in {p.name for p in tmp_path.iterdir()}
    same = carry.update(1, [], set(), testable, max_windows=3, max_records=10)
    assert same.save(tmp_path, 2) == first  # nothing came or went: the file of window 1 stands
    grown = same.update(2, [record(2, 1)], set(), testable, max_windows=3, max_records=10)
    assert grown.save(tmp_path, 3)["file"] != first["file"] and len(Carry.load(tmp_path, {"carry": grown.save(tmp_path, 3)}).records) == 2
    aged = grown.update(4, [], set(), testable, max_windows=3, max_records=10)  # r0 came in window 0: 4 windows old
    assert [r.request_id for r in aged.records] == ["r2"] and aged.save(tmp_path, 5)["file"] != first["file"]
    assert Carry().update(5, [], {1}, testable, 3, 10).save(tmp_path, 6) is None
