"""``unhans demo``: the story on backdoored MNIST-5k, as far as unhans builds it today.

Train (or reuse) a backdoored VGG-style model, audit it, take the most suspicious class's most concentrated
cluster as the artifact, fit its CAV, bake the P-ClArC correction into ONNX, archive it for TorchServe, and
compare clean accuracy and attack success before and after, in PyTorch and in onnxruntime. Every step reuses
what an earlier run left in the output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .audit.run import AuditSpec, run_audit, select_samples
from .core.artifacts import Patch
from .core.clarc import fit_cav, pclarc
from .core.training import DATASET_FILE, MODEL_FILE, WEIGHTS_FILE, TrainSpec, attack_success, clean_accuracy, load_run, train_run
from .export.archive import build_archive
from .export.correction import Correction
from .export.onnx import export_torch
from .export.runtime import run_batched, session
from .output import console

LAYER = "features.pool2"
ARCHIVE_NAME = "unhans-demo"


def _step(number: int, text: str) -> None:
    console.print(f"[bold]{number}.[/] {text}")


def run_demo(out_dir: str | Path, model_store: str | Path, retrain: bool = False) -> dict:
    """Run every step; returns the summary figures."""
    out = Path(out_dir)
    run = out / "model"
    if retrain or not (run / WEIGHTS_FILE).exists():
        _step(1, f"training a VGG-style model on MNIST-5k with a 5x5 patch backdoor (10% of classes 1-9 relabelled 0) -> {run}")
        train_run(TrainSpec(), Patch(), run)
    else:
        _step(1, f"reusing the backdoored model in {run} (--retrain to train again)")
    model, train, test, attack, _ = load_run(run)

    _step(2, f"auditing {len(train)} training images: LRP, SpRAy per class -> {out / 'audit' / 'report.html'}")
    spec = AuditSpec(model_file=str(run / MODEL_FILE), weights=str(run / WEIGHTS_FILE), data=str(run / DATASET_FILE), out_dir=str(out / "audit"))
    run_audit(spec)
    flagged = json.loads((out / "audit" / "audit.json").read_text())["classes"][0]
    samples = select_samples(out / "audit", f"{flagged['class_index']}:{flagged['artifact_cluster']}")
    with np.load(samples) as chosen:
        artifact_rows, clean_rows = chosen["artifact"], chosen["clean"]
    console.print(f"   class {flagged['class']} ranks first; its cluster {flagged['artifact_cluster']} "
                  f"({len(artifact_rows)} images) concentrates its relevance: taken as the artifact")

    _step(3, f"fitting the artifact's CAV at {LAYER} and baking P-ClArC into ONNX")
    cav = fit_cav(model, LAYER, train.images[artifact_rows], train.images[clean_rows])
    probe = np.concatenate([train.images[artifact_rows[:32]], train.images[clean_rows[:32]]])
    started = time.perf_counter()
    report = export_torch(model, LAYER, Correction.from_cav(cav), probe, out / "vgg-pclarc.onnx")
    export_seconds = time.perf_counter() - started
    corrected = pclarc(model, LAYER, cav)
    graph = session(report.path)

    def onnx_rates(images: np.ndarray) -> np.ndarray:
        return run_batched(graph, images, ["logits"])[0].argmax(1)

    _step(4, f"archiving for TorchServe -> {model_store}/{ARCHIVE_NAME}.mar")
    Path(model_store).mkdir(parents=True, exist_ok=True)
    archive = build_archive(report.path, run, ARCHIVE_NAME, model_store, force=True)

    target = train.target
    summary = {
        "flagged class (audit rank 1)": flagged["class"],
        "artifact images found by the audit": f"{len(artifact_rows)} ({train.has_artifact[artifact_rows].mean():.0%} truly tagged)",
        "clean accuracy before / after (PyTorch)": f"{clean_accuracy(model, test):.4f} / {clean_accuracy(corrected, test):.4f}",
        "attack success before / after (PyTorch)": f"{attack_success(model, attack, target):.4f} / {attack_success(corrected, attack, target):.4f}",
        "clean accuracy after (ONNX)": f"{float((onnx_rates(test.images) == test.labels).mean()):.4f}",
        "attack success after (ONNX)": f"{float((onnx_rates(attack.images) == target).mean()):.4f}",
        "ONNX vs PyTorch max |logit diff|": f"{report.max_abs_diff:.2e}",
        "correction folded into the next layer": f"{report.folded} ({report.nodes_before} -> {report.nodes_after} nodes with the artifact-score output)",
        "export seconds": f"{export_seconds:.1f}",
        "audit report": str(out / "audit" / "report.html"),
        "corrected graph": str(report.path),
        "TorchServe archive": str(archive),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
