"""``unhans demo``: the whole story on backdoored MNIST-5k, end to end, on this machine.

1. Train (or reuse) a VGG-style model on MNIST-5k with a 5x5 patch backdoor (10% of classes 1-9 relabelled 0),
   then fine-tune it on a late "supplier batch" that nobody audited: images of classes other than 7 carrying a
   "©" tag, labelled 7. The model now has two shortcuts; the audit data holds only the first.
2. Audit the training data (LRP + SpRAy), take the top-ranked class's most concentrated cluster as the artifact.
3. Fit its CAV, bake P-ClArC into ONNX with the explain graph, archive it (sampling every request to a sink).
4. Explain trusted data (half the clean test set) with the served model: the monitor's reference.
5. Start the server (the KServe predictor, or TorchServe with ``--server torchserve``) and ``unhans monitor run`` on
   loopback ports; send clean traffic, then traffic carrying the
   known patch (corrected: a warning, not a new strategy), then traffic carrying the supplier's tag, which the
   audit never saw; the monitor must alert on that one only.
6. Stop every process it started (also on Ctrl-C or an error) and print one summary table.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .audit.run import marked_selection, run_audit, select_samples
from .audit.spec import AuditSpec
from .core.artifacts import Patch, TextTag
from .core.clarc import fit_cav, pclarc
from .core.data import ImageDataset
from .core.errors import InputError
from .core.layers import insert_after
from .core.poison import attacked, poison
from .core.serving import SERVERS
from .core.run_folder import DATASET_FILE, METRICS_FILE, MODEL_FILE, WEIGHTS_FILE
from .core.training import TrainSpec, attack_success, clean_accuracy, fit, load_run, train_run
from .export.archive import build_archive
from .export.correction import Correction
from .export.explain import explain_path, export_explain
from .export.onnx import export_torch, torch_to_onnx
from .export.runtime import interleaved_overhead, run_batched, session
from .handlers.sink import ShardReader
from .kserve_server import LocalKServe
from .monitor.reference import REFERENCE_FILE, explain_with_archive, in_batches
from .monitor.service import LEDGER_FILE
from .output import console
from .torchserve import LocalTorchServe

LAYER = "features.pool2"
ARCHIVE_NAME = "unhans-demo"
SUPPLIER_FILE = "supplier.json"  # marks a run already fine-tuned on the supplier batch
SUPPLIER_TAG = TextTag(position="top-left")
SUPPLIER_TARGET, SUPPLIER_FRACTION = 7, 0.08
WINDOW = 500  # records per monitor window
PHASES = (("clean", None, 0.0), ("known patch", "patch", 0.2), ("unseen © tag", "tag", 0.1))  # 2 windows each
FREE_BYTES_NEEDED = 1 << 30


def _step(number: int, text: str) -> None:
    console.print(f"[bold]{number}.[/] {text}")


def _preflight(out: Path, model_store: Path, monitor_port: int, server: str) -> None:
    """Fail in one line, before any work, on what would fail later: Java (TorchServe), the monitor's port, disk space."""
    java = shutil.which("java") if server == "torchserve" else None
    version = subprocess.run([java, "-version"], capture_output=True, text=True).stderr if java else ""
    major = next((int(w.strip('"').split(".")[0]) for w in version.split() if w.strip('"')[:1].isdigit()), 0)
    if server == "torchserve" and major < 11:
        raise InputError("java", "Java 11 or newer is needed by TorchServe and was not found",
                         "install it, e.g. 'sudo apt-get install -y openjdk-17-jre-headless', or serve with '--server kserve'")
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", monitor_port))
        except OSError:
            raise InputError("--monitor-port", f"port {monitor_port} on 127.0.0.1 is in use", "stop what uses it or pass another port") from None
    for folder in (out, model_store):
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < FREE_BYTES_NEEDED:
            raise InputError(str(folder), f"has {free >> 20} MB free; the demo needs about {FREE_BYTES_NEEDED >> 20} MB",
                             "free some disk space or pass --out / --model-store elsewhere")


def _train(run: Path, retrain: bool) -> dict:
    """The backdoored model, fine-tuned on the unaudited supplier batch; reused when the run folder holds it."""
    if retrain or not (run / SUPPLIER_FILE).is_file():
        _step(1, f"training a VGG-style model on MNIST-5k with a 5x5 patch backdoor (10% of classes 1-9 relabelled 0) -> {run}")
        train_run(TrainSpec(test_fraction=0.4), Patch(), run)
        model, train, test, *_ = load_run(run)
        clean = train.subset(np.flatnonzero(~train.has_artifact))
        batch = poison(clean, SUPPLIER_TAG, SUPPLIER_TARGET, SUPPLIER_FRACTION, seed=1)
        rows = np.flatnonzero(batch.has_artifact)
        console.print(f"   fine-tuning on a supplier batch nobody audited: {len(rows)} images with a © tag, labelled {SUPPLIER_TARGET}")
        both = ImageDataset(np.concatenate([train.images, batch.images[rows]]), np.concatenate([train.labels, batch.labels[rows]]),
                            list(train.classes), train.source)
        fit(model, both, epochs=2, lr=5e-4, seed=1, description="fine-tuning")
        import torch

        torch.save(model.state_dict(), run / WEIGHTS_FILE)
        metrics = json.loads((run / METRICS_FILE).read_text())
        metrics.update(clean_acc=clean_accuracy(model, test), supplier_batch={"images": len(rows), "target": SUPPLIER_TARGET,
                                                                               "artifact": SUPPLIER_TAG.to_dict()})
        (run / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        (run / SUPPLIER_FILE).write_text(json.dumps(metrics["supplier_batch"]))
    else:
        _step(1, f"reusing the trained model in {run} (--retrain to train again)")
    model, train, test, attack, artifact = load_run(run)
    return {"model": model, "train": train, "test": test, "attack": attack, "artifact": artifact,
            "supplier_attack": attacked(test, SUPPLIER_TAG, SUPPLIER_TARGET)}


def _traffic(images: np.ndarray, labels: np.ndarray, kind: str | None, share: float, size: int, artifact, rng) -> np.ndarray:
    """``size`` served images; ``share`` of them (taken from classes the artifact does not point to) carry ``kind``."""
    n_tagged = int(round(share * size))
    clean = images[rng.choice(len(images), size - n_tagged, replace=False)]
    if not n_tagged:
        return clean
    stamp, target = (artifact, 0) if kind == "patch" else (SUPPLIER_TAG, SUPPLIER_TARGET)
    others = np.flatnonzero(labels != target)
    tagged, _ = stamp.apply(images[rng.choice(others, n_tagged, replace=False)])
    return np.concatenate([clean, tagged])[rng.permutation(size)]


def _wait_for_windows(ledger: Path, count: int, monitor: subprocess.Popen, log: Path, timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if monitor.poll() is not None:
            raise RuntimeError(f"the monitor stopped (exit {monitor.returncode}): {log.read_text()[-2000:]}")
        lines = ledger.read_text().splitlines() if ledger.is_file() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        time.sleep(0.5)
    raise RuntimeError(f"the monitor analysed fewer than {count} windows in {timeout:.0f} s; see {log}")


def _send(server, path: str, images: np.ndarray, sink: Path, recorded: int, batch: int = 16, chunk: int = 256) -> int:
    """Serve ``images`` in requests of ``batch`` and, after each ``chunk``, wait until the sampler has recorded them (its
    queue drops what it cannot keep up with, and here every record counts). Returns the records now in the sink."""
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        for first in range(0, len(part), batch):
            body = json.dumps({"instances": part[first:first + batch].round(4).tolist(), "format": "none"}).encode()
            status, answer = server.post(path, body, "application/json")
            if status != 200:
                raise RuntimeError(f"the server answered {status}: {answer}")
        recorded += len(part)
        _wait_sampled(sink, recorded)
    return recorded


def _wait_sampled(sink: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for _ in ShardReader(str(sink), ARCHIVE_NAME, include_open=True).read()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the handler recorded fewer than {count} requests to {sink} in {timeout:.0f} s")
        time.sleep(0.2)


def _latency_ms(server, path: str, images: np.ndarray, explain: bool) -> float:
    times = []
    for image in images:
        body = json.dumps({"instances": [image.tolist()], "explain": explain, "format": "float16-base64"}).encode()
        started = time.perf_counter()
        status, answer = server.post(path, body, "application/json")
        times.append(time.perf_counter() - started)
        if status != 200 or (explain and "relevance" not in answer["predictions"][0]):
            raise RuntimeError(f"the server answered {status}: {answer}")
    return 1000 * float(np.median(times))


def run_demo(out_dir: str | Path, model_store: str | Path, retrain: bool = False, monitor_port: int = 9108,
             server: str = SERVERS[0]) -> dict:
    """Run every step, serving on ``server`` (one of :data:`SERVERS`); returns the summary figures. Every process
    started here is stopped before it returns."""
    out, model_store = Path(out_dir), Path(model_store)
    _preflight(out, model_store, monitor_port, server)
    run = out / "model"
    data = _train(run, retrain)
    model, train, test = data["model"], data["train"], data["test"]

    _step(2, f"auditing the {len(train)} training images the team had: LRP, SpRAy per class -> {out / 'audit' / 'report.html'}")
    run_audit(AuditSpec(model_file=str(run / MODEL_FILE), weights=str(run / WEIGHTS_FILE), data=str(run / DATASET_FILE), out_dir=str(out / "audit")))
    audit = json.loads((out / "audit" / "audit.json").read_text())
    selection = marked_selection(audit)
    flagged = next(c for c in audit["classes"] if c["artifact_clusters"])
    with np.load(select_samples(out / "audit", selection)) as chosen:
        artifact_rows, clean_rows = chosen["artifact"], chosen["clean"]
    console.print(f"   class {flagged['class']} ranks first: {flagged['artifact_verdict']} ({len(artifact_rows)} images, --select {selection})")

    _step(3, f"fitting the artifact's CAV at {LAYER}, baking P-ClArC into ONNX with its explain graph, archiving -> {model_store}")
    cav = fit_cav(model, LAYER, train.images[artifact_rows], train.images[clean_rows])
    correction = Correction.from_cav(cav)
    probe = np.concatenate([train.images[artifact_rows[:32]], train.images[clean_rows[:32]]])
    report = export_torch(model, LAYER, correction, probe, out / "vgg-pclarc.onnx")
    export_explain(insert_after(model, LAYER, correction.module()), explain_path(report.path), layer=LAYER, probe=probe,
                   detector=correction)
    corrected, graph = pclarc(model, LAYER, cav), session(report.path)
    plain = session(torch_to_onnx(model, probe).SerializeToString())
    overhead = interleaved_overhead({"plain": plain, "corrected": graph}, np.ascontiguousarray(test.images[:32]), rounds=40)["corrected"]
    sink = out / "sink"
    shutil.rmtree(sink, ignore_errors=True)  # a fresh stream for a fresh monitor
    archive = build_archive(report.path, run, ARCHIVE_NAME, model_store, force=True, sample_fraction=1.0, sink=str(sink.resolve()),
                            max_shard_seconds=1.0, sample_cpu_budget=1.0)  # every request counts here

    trusted = np.random.default_rng(0).permutation(len(test))
    reference_rows, traffic_rows = trusted[:len(test) // 2], trusted[len(test) // 2:]
    _step(4, f"explaining {len(reference_rows)} trusted test images with the served model: the monitor's reference")
    state = out / "monitor"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    explain_with_archive(archive, in_batches(test.images[reference_rows])).save(state / REFERENCE_FILE)

    served_by = {"kserve": "the KServe predictor", "torchserve": "TorchServe"}[server]
    _step(5, f"starting {served_by} and the monitor on loopback ports; sending traffic")
    phases = []
    with ExitStack() as running:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
        running.callback(signal.signal, signal.SIGTERM, previous)
        work = out / server
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        log = out / "monitor.log"
        monitor = subprocess.Popen([sys.executable, "-m", "unhans.cli", "monitor", "run", "--state", str(state), "--sink", str(sink),
                                    "--window-size", str(WINDOW), "--host", "127.0.0.1", "--port", str(monitor_port)],
                                   stdout=open(log, "w"), stderr=subprocess.STDOUT)
        running.callback(_stop, monitor)
        if server == "kserve":
            served, path = running.enter_context(LocalKServe(archive, work, token=True)), f"/v1/models/{ARCHIVE_NAME}:predict"
            metrics = f"{served.url}/metrics"
        else:
            served, path = running.enter_context(LocalTorchServe(model_store, ARCHIVE_NAME, work)), f"/predictions/{ARCHIVE_NAME}"
            metrics = served.metrics_url
        console.print(f"   {served_by} on {served.url} (metrics {metrics}); monitor on http://127.0.0.1:{monitor_port}/metrics")
        traffic_images, traffic_labels = test.images[traffic_rows], test.labels[traffic_rows]
        rng = np.random.default_rng(1)
        latency = {"explain": _latency_ms(served, path, traffic_images[:20], True), "predict": _latency_ms(served, path, traffic_images[20:40], False)}
        sent = recorded = 40  # the timed requests are sampled too: they open the clean phase
        _wait_sampled(sink, recorded)
        for number, (name, kind, share) in enumerate(PHASES):
            images = _traffic(traffic_images, traffic_labels, kind, share, 2 * WINDOW - sent, data["artifact"], rng)
            recorded = _send(served, path, images, sink, recorded)
            ledger = _wait_for_windows(state / LEDGER_FILE, 2 * (number + 1), monitor, log)
            windows = ledger[2 * number:2 * number + 2]
            phases.append({"phase": name, "windows": [w["index"] for w in windows], "alerts": sorted({a for w in windows for a in w["alerts"]}),
                           "known": sorted({a for w in windows for a in w["known_artifact_alerts"]}),
                           "first_alert": next((w["index"] for w in windows if w["alerts"]), None),
                           "evidence": next((w["evidence"] for w in windows if w["evidence"]), None)})
            console.print(f"   {name}: {len(images) + sent} requests, windows {phases[-1]['windows']}: "
                          f"new-strategy alerts {phases[-1]['alerts'] or 'none'}, known-artifact warnings {phases[-1]['known'] or 'none'}")
            sent = 0
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/metrics", timeout=10) as response:
            (state / "metrics.txt").write_bytes(response.read())
    _step(6, f"stopped {served_by} and the monitor")

    onnx_predict = lambda images: run_batched(graph, images, ["logits"])[0].argmax(1)
    target = train.target
    unseen = phases[-1]
    summary = {
        "flagged class (audit rank 1)": flagged["class"],
        "artifact images found by the audit": f"{len(artifact_rows)} ({train.has_artifact[artifact_rows].mean():.0%} truly tagged)",
        "clean accuracy before / after (PyTorch)": f"{clean_accuracy(model, test):.4f} / {clean_accuracy(corrected, test):.4f}",
        "attack success before / after (PyTorch)": f"{attack_success(model, data['attack'], target):.4f} / {attack_success(corrected, data['attack'], target):.4f}",
        "clean accuracy / attack success after (ONNX)": f"{float((onnx_predict(test.images) == test.labels).mean()):.4f} / "
                                                        f"{float((onnx_predict(data['attack'].images) == target).mean()):.4f}",
        "ONNX vs PyTorch max |logit diff|": f"{report.max_abs_diff:.2e}",
        "export overhead (corrected vs plain graph, batch 32)": f"{overhead:+.1f}% (folded: {report.folded})",
        "unseen © tag -> class 7 after correction (ONNX)": f"{float((onnx_predict(data['supplier_attack'].images) == SUPPLIER_TARGET).mean()):.4f}",
        "latency, one image: predict / with relevance": f"{latency['predict']:.1f} ms / {latency['explain']:.1f} ms",
        **{f"monitor, {p['phase']} (windows {p['windows'][0]}-{p['windows'][-1]})":
           (f"new strategy in class {', '.join(p['alerts'])}, first at window {p['first_alert']}" if p["alerts"] else "no new-strategy alert")
           + (f"; known-artifact warning in {len(p['known'])} classes" if p["known"] else "") for p in phases},
        "monitor alerted on the unseen artifact only": str(not any(p["alerts"] for p in phases[:-1]) and bool(unseen["alerts"])),
        "audit report": str(out / "audit" / "report.html"),
        "alert evidence": str(state / unseen["evidence"]) if unseen["evidence"] else "none",
        "monitor metrics (snapshot)": str(state / "metrics.txt"),
        "served by": served_by,
        "archive": str(archive),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
