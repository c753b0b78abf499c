"""Benchmark: a real, published shortcut in a real model, removed with the tool's defaults: ImageNet-W on EfficientNet-Lite0.

    python bench/imagenet_w.py [--json PATH] [--photos ../shared/imagenet-sample] [--cache DIR]

The two exports' graphs and figures are kept in the cache (default: the system's temporary folder); delete it to
measure them again.

EfficientNet-Lite0 with its ImageNet weights reads ImageNet-W's watermark (Li et al., CVPR 2023; PyPI ``imagenet-w``,
``AddWatermark(224)``: 捷径捷径捷径, white at 50% opacity, at 1% / 40% of a 224-px view) as "carton" (class 478). The 500
photos of ``../shared/imagenet-sample`` (one per even ImageNet class, named by class index, ``classes.txt`` beside them)
are split by position: the even positions (250) are the user's photos the correction is fitted on, the odd positions
(250) are the evaluation half; nothing of one is in the other. Exits 2 when the folder is absent.

The export runs as a user runs it (a subprocess of the CLI), with every default: no ``--layer`` (``auto``), no ``--max-cost``,
the fitting half labelled by its file names through ``--classes``, and the watermark as an RGBA PNG (the text
AddWatermark draws, cut to its box) pasted at its ImageNet-W place. Keys, on the evaluation half:

- inw_gap_pt_before / inw_gap_pt_after: top-1 accuracy with the watermark minus clean, uncorrected / corrected graph;
- control_overlay_gap_pt (and _after): the same overlay with Latin text "ABCDEFGHIJ", which no correction targets;
- carton_marked_before / carton_marked_after: watermarked photos predicted "carton";
- clean_acc_drop_pt, clean_top1_agreement: clean accuracy lost, and top-1 agreement of corrected with uncorrected;
- chosen_layer: the block ``--layer auto`` took (recorded in the graph, ``unhans inspect``);
- detector_heldout_acc: the graph's ``artifact_score`` > 0 on watermarked and <= 0 on clean evaluation photos;
- export_peak_rss_mb, export_seconds: the export's child process (peak RSS, wall time);
- explain_export_peak_rss_mb: the same export with ``--explain`` (the ONNX explain graph);
- explain_latency_ms_b1: the archive (graph, explain graph, ImageNet contract) in one real KServe predictor, one
  ``:explain`` request of one JPEG at a time, median over 20 evaluation photos.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import report

TARGETS = {"inw_gap_pt_after": ">= -5 (goal >= -3)", "carton_marked_after": "<= 1", "clean_acc_drop_pt": "<= 0.5",
           "clean_top1_agreement": ">= 0.99", "detector_heldout_acc": ">= 0.95", "export_peak_rss_mb": "<= 2000",
           "explain_export_peak_rss_mb": "<= 4000"}
CARTON, CONTROL_TEXT, LATENCY_PHOTOS = 478, "ABCDEFGHIJ", 20
IMAGENET = ["--size", "224", "--resize", "256", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]
UNHANS = [sys.executable, "-m", "unhans.cli"]
# a fresh interpreter per measured command: its RUSAGE_CHILDREN is that command's alone
MEASURED = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); code = subprocess.run(sys.argv[1:]).returncode; "
            "print(json.dumps({'rc': code, 'seconds': time.perf_counter() - t, "
            "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")


def contract():
    from unhans.core.contract import InputContract
    from unhans.core.models.zoo import IMAGENET_MEAN, IMAGENET_STD

    return InputContract(3, 224, 224, list(IMAGENET_MEAN), list(IMAGENET_STD), resize=256)


def add_watermark():
    """PyPI imagenet-w's ``AddWatermark(224)``, imported with this folder off the path: this file's name shadows it."""
    import importlib

    here = Path(__file__).resolve().parent
    kept = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        return importlib.import_module("imagenet_w").AddWatermark(224)
    finally:
        sys.path[:] = kept


def overlay(pixels: np.ndarray, text: str | None = None) -> np.ndarray:
    """ImageNet-W's overlay (or the same with ``text``) on 224-px views (N, 3, 224, 224) in [0, 1]."""
    from PIL import Image

    mark = add_watermark()
    out = [np.asarray(mark(Image.fromarray((p.transpose(1, 2, 0) * 255).round().astype(np.uint8)), text), np.float32) / 255 for p in pixels]
    return np.stack(out).transpose(0, 3, 1, 2)


def watermark_png(path: Path) -> str:
    """The watermark as a user would hold it: the RGBA text AddWatermark draws, cut to its box; returns ``--position``."""
    from PIL import Image, ImageDraw

    mark = add_watermark()
    canvas = Image.new("RGBA", (224, 224), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((mark.x_pos * 224, mark.y_pos * 224), mark.text, fill=(*mark.color, round(mark.opacity * 255)), font=mark.font)
    left, top, right, bottom = canvas.getbbox()
    canvas.crop((left, top, right, bottom)).save(path)
    return f"{top},{left}"


def split(photos: Path, cache: Path) -> tuple[Path, list[Path]]:
    """The fitting half as a folder of links (even positions), and the evaluation half's files (odd positions)."""
    files = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    fit = cache / "fit"
    fit.mkdir(parents=True, exist_ok=True)
    for path in files[0::2]:
        if not (fit / path.name).exists():
            (fit / path.name).symlink_to(path.resolve())
    return fit, files[1::2]


def measured(command: list[str]) -> dict:
    """Run ``command`` as a child of a fresh interpreter; its exit code, wall seconds and peak RSS."""
    done = subprocess.run([sys.executable, "-c", MEASURED, *command], stdout=subprocess.PIPE, text=True)
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    print("\n".join(lines[:-1]))
    if figures["rc"] != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {figures['rc']}")
    return figures


def explain_latency(cache: Path, graph: Path, model_dir: Path, classes: Path, files: list[Path]) -> float:
    """Median ms of one :explain request of one JPEG at a time, in one real KServe predictor serving the archive."""
    from PIL import Image

    from unhans.handlers.requests import decode_relevance
    from unhans.kserve_server import LocalKServe

    store = cache / "store"
    store.mkdir(exist_ok=True)
    subprocess.run([*UNHANS, "archive", "--onnx", str(graph), "--model", str(model_dir / "model.py"), "--weights", str(model_dir / "weights.pt"),
                    "--classes", str(classes), *IMAGENET, "--name", "lite0w", "--model-store", str(store), "--threads", "2", "--force"], check=True)
    bodies = []
    for path in files[:LATENCY_PHOTOS]:
        buffer = io.BytesIO()
        with Image.open(path) as picture:
            picture.convert("RGB").save(buffer, format="JPEG", quality=90)
        bodies.append(json.dumps({"instances": [{"b64": base64.b64encode(buffer.getvalue()).decode()}]}).encode())
    times = []
    with tempfile.TemporaryDirectory() as work, LocalKServe(store / "lite0w.mar", work, ready_timeout=300, keep_alive=True) as server:
        for round_ in range(2):  # the first round warms the server up and is not counted
            for body in bodies:
                started = time.perf_counter()
                status, answer = server.post("/v1/models/lite0w:explain", body, "application/json")
                elapsed = time.perf_counter() - started
                assert status == 200, answer
                assert decode_relevance(answer["predictions"][0]["relevance"]).shape == (224, 224)
                if round_:
                    times.append(1000 * elapsed)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--photos", type=Path, default=Path("../shared/imagenet-sample"))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "unhans-imagenet-w")
    args = parser.parse_args()
    classes = args.photos / "classes.txt"
    if not classes.is_file():
        print(f"{args.photos} holds no ImageNet photos with classes.txt (the 500 of ../shared/imagenet-sample); nothing measured")
        raise SystemExit(2)
    import torch

    from unhans.core.models import load_model
    from unhans.core.models.zoo import write_efficientnet_lite0
    from unhans.export.onnx import read_metadata
    from unhans.export.runtime import run_batched, session

    cache = args.cache
    fit, evaluation = split(args.photos, cache)
    model_dir = cache / "lite0"
    write_efficientnet_lite0(model_dir)
    position = watermark_png(cache / "watermark.png")
    export = [*UNHANS, "export", "--model", str(model_dir / "model.py"), "--weights", str(model_dir / "weights.pt"),
              "--images", str(fit), "--classes", str(classes), "--artifact-image", str(cache / "watermark.png"), "--position", position, *IMAGENET]
    runs = cache / "exports.json"  # the exports' figures, kept with their graphs: delete the cache to measure again
    if not runs.is_file():
        runs.write_text(json.dumps({"plain": measured([*export, "--out", str(cache / "lite0w.onnx")]),
                                    "explained": measured([*export, "--explain", "--out", str(cache / "explained" / "lite0w.onnx")])}))
    plain, explained = (json.loads(runs.read_text())[key] for key in ("plain", "explained"))

    view = contract()
    clean = view.load(evaluation)
    labels = np.array([int(p.name.split("_")[0]) for p in evaluation])
    inputs = {"clean": view.normalise(clean), "marked": view.normalise(overlay(clean)), "control": view.normalise(overlay(clean, CONTROL_TEXT))}
    model = load_model(model_dir / "model.py", model_dir / "weights.pt").eval()
    graph = session(cache / "lite0w.onnx", threads=2, cuda=False)
    before, after, scores = {}, {}, {}
    for name, x in inputs.items():
        with torch.no_grad():
            before[name] = np.concatenate([model(torch.from_numpy(x[i:i + 16])).numpy() for i in range(0, len(x), 16)]).argmax(1)
        logits, scores[name] = run_batched(graph, x)
        after[name] = logits.argmax(1)
    accuracy = lambda predicted: 100 * float((predicted == labels).mean())  # noqa: E731
    detected = np.r_[scores["marked"] > 0, scores["clean"] <= 0]
    metadata = read_metadata(cache / "lite0w.onnx")
    figures = {
        "inw_gap_pt_before": accuracy(before["marked"]) - accuracy(before["clean"]),
        "inw_gap_pt_after": accuracy(after["marked"]) - accuracy(after["clean"]),
        "control_overlay_gap_pt": accuracy(before["control"]) - accuracy(before["clean"]),
        "control_overlay_gap_pt_after": accuracy(after["control"]) - accuracy(after["clean"]),
        "carton_marked_before": int((before["marked"] == CARTON).sum()), "carton_marked_after": int((after["marked"] == CARTON).sum()),
        "clean_acc_before": accuracy(before["clean"]), "clean_acc_drop_pt": accuracy(before["clean"]) - accuracy(after["clean"]),
        "clean_top1_agreement": float((before["clean"] == after["clean"]).mean()),
        "chosen_layer": metadata["unhans.correction.layer"], "correction_reactive": metadata["unhans.correction.reactive"],
        "detector_heldout_acc": float(detected.mean()),
        "export_peak_rss_mb": plain["peak_rss_mb"], "explain_export_peak_rss_mb": explained["peak_rss_mb"],
        "export_seconds": plain["seconds"], "explain_export_seconds": explained["seconds"],
        "explain_latency_ms_b1": explain_latency(cache, cache / "explained" / "lite0w.onnx", model_dir, classes, evaluation),
        "fitting_photos": len(list(fit.iterdir())), "evaluation_photos": len(evaluation),
    }
    report("ImageNet-W on EfficientNet-Lite0: the tool's defaults, evaluation half", figures, TARGETS, args.json)


if __name__ == "__main__":
    main()
