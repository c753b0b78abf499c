"""Benchmark: LRP on the model matrix at 224x224 (unhans.core.models.zoo): canonization, conservation, explain graph.

    python bench/models.py [--json PATH] [--models NAME ...] [--rounds N] [--size 224] [--lrp-only]

Per model (key prefix the model's name, e.g. resnet50_): conservation_rel_err (bias-free LRP relevance, float64, vs
the output relevance of 1; target <= 1e-3), canonized_output_max_abs_diff (canonized vs original logits, relative to
the largest logit; <= 1e-4), explain_rel_l2_vs_zennit (explain graph in onnxruntime vs zennit, worst of predicted and
given targets; <= 1e-4; where float32 LRP of a model is ill-conditioned also _vs_zennit64 and zennit's own float32
error), explain_speedup_vs_zennit_b1/_b16 (zennit with hooks kept, torch 1 thread, over the explain graph, onnxruntime
1 thread; >= 3 / >= 2), explain_over_predict_b16 (explain graph over the prediction graph, both onnxruntime; <= 4),
export_seconds, deletion_auc_vs_gradxinput (area under the pixel-deletion curve of our relevance over that of
gradient x input on the same photos and targets: lower is more faithful, below 1 beats gradient x input; report).
explained is 1 where LRP explains the model (canonized, same logits, conservative); explain_graph is 1 where the ONNX
explain graph is built too (else explain_refused says why, and the graph's figures are left out: such a model is
served through its PyTorch twin, so its explain_over_predict_b16 is the twin's, LRP over the forward pass, both
torch, and explain_over_predict_source says which). --lrp-only keeps to the LRP figures (conservation, canonization,
deletion): what models_explained needs, in minutes for all 11 models. Summary: models_explained,
models_with_explain_graph, worst_conservation_rel_err. Inputs are real photos (scikit-image's),
ImageNet-normalised; weights are random but EfficientNet-Lite0's. Both sides of each ratio are timed interleaved, round
by round, and each figure is the median of the rounds' ratios; a model gets as many rounds (at least 2, at most
--rounds) as fit its share of the time budget, and the count is reported as <model>_rounds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import report

from unhans.core.attribution import LRP
from unhans.core.errors import InputError
from unhans.core.models.zoo import MATRIX, build, photos
from unhans.export.explain import _build
from unhans.export.onnx import torch_to_onnx
from unhans.export.runtime import session

TARGETS = {"conservation_rel_err": "<= 1e-3", "canonized_output_max_abs_diff": "<= 1e-4", "explain_rel_l2_vs_zennit": "<= 1e-4",
           "explain_speedup_vs_zennit_b1": ">= 3", "explain_speedup_vs_zennit_b16": ">= 2", "explain_over_predict_b16": "<= 4"}
SECONDS_PER_MODEL = 90  # timing budget per model, beyond its export: 8 models in about 20 minutes on 2 cores
DELETION_STEPS = 16  # the deletion curve: the most relevant 1/16 of the pixels, 2/16, ... all, set to 0 (the mean)


@torch.no_grad()
def deletion_auc(model, images: np.ndarray, maps: np.ndarray, targets: np.ndarray) -> float:
    """Mean over images of the area under the target's softmax probability as pixels are deleted most relevant first
    (all channels of a pixel at once, set to 0: the dataset mean after normalisation; trapezoids over the deleted
    share): a faithful map makes the probability fall fast, so its area is small. Both methods see the same images
    and targets, so the ratio of their areas compares them (random weights give small probabilities)."""
    n, _, h, w = images.shape
    order = np.argsort(-maps.sum(1).reshape(n, -1), axis=1)
    areas = []
    for i in range(n):
        steps = np.repeat(images[i : i + 1], DELETION_STEPS + 1, axis=0).reshape(DELETION_STEPS + 1, images.shape[1], -1)
        for k in range(1, DELETION_STEPS + 1):
            steps[k, :, order[i, : k * h * w // DELETION_STEPS]] = 0.0
        logits = model(torch.from_numpy(steps.reshape(-1, *images.shape[1:]))).double()
        curve = torch.softmax(logits, 1)[:, int(targets[i])].numpy()
        areas.append(float(((curve[1:] + curve[:-1]) / 2).mean()))
    return float(np.mean(areas))


def gradient_x_input(model, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(logits, x, torch.nn.functional.one_hot(torch.from_numpy(targets), logits.shape[1]).float())
    return (x * grad).detach().numpy()


def _timed(fn, times: list) -> None:
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)


def twin_over_predict(model, x: np.ndarray, max_rounds: int) -> tuple[float, int]:
    """The PyTorch twin's LRP over its forward pass (interleaved rounds, the median ratio) and the rounds run."""
    tensor, ratios = torch.from_numpy(x), []
    budget_end = time.perf_counter() + SECONDS_PER_MODEL
    def forward():
        with torch.no_grad():
            model(tensor)

    with LRP(model, check=False) as lrp:
        lrp(tensor[:1])  # warm
        while len(ratios) < max_rounds and (len(ratios) < 2 or time.perf_counter() < budget_end):
            explain, predict = [], []
            _timed(lambda: lrp(tensor), explain)
            _timed(forward, predict)
            ratios.append(explain[0] / predict[0])
    return float(np.median(ratios)), len(ratios)


def measure(name: str, size: int, max_rounds: int, lrp_only: bool = False) -> dict:
    model = build(name)
    images = photos(17, size)
    probe, b16, b1 = images[:4], images[1:17], images[:1]
    figures = {}
    try:
        with LRP(model) as lrp:
            conservation = lrp.check(torch.from_numpy(probe))
            figures[f"{name}_conservation_rel_err"] = conservation.rel_err
            figures[f"{name}_conservation_worst_layer"] = conservation.worst_layer
            explanation = lrp(torch.from_numpy(probe))
            figures[f"{name}_canonized_output_max_abs_diff"] = lrp.output_max_abs_diff / max(1.0, float(np.abs(explanation.logits).max()))
    except InputError as error:
        figures.update({f"{name}_explained": 0, f"{name}_refused": str(error), f"{name}_conservation_rel_err": float("inf")})
        return figures
    figures[f"{name}_explained"] = 1
    ours = deletion_auc(model, probe, explanation.relevance, explanation.targets)
    theirs = deletion_auc(model, probe, gradient_x_input(model, probe, explanation.targets), explanation.targets)
    figures.update({f"{name}_deletion_auc": ours, f"{name}_deletion_auc_gradxinput": theirs,
                    f"{name}_deletion_auc_vs_gradxinput": ours / theirs})
    if lrp_only:
        return figures
    started = time.perf_counter()
    try:
        graph, built = _build(model, "epsilon_plus_flat", None, probe, 0.0, 1.0)
    except InputError as error:
        figures[f"{name}_explain_graph"] = 0
        figures[f"{name}_explain_refused"] = str(error)
        ratio, rounds = twin_over_predict(model, b16, max_rounds)
        figures.update({f"{name}_explain_over_predict_b16": ratio, f"{name}_explain_over_predict_source": "pytorch twin",
                        f"{name}_rounds": rounds})
        return figures
    figures[f"{name}_explain_graph"] = 1
    figures[f"{name}_export_seconds"] = time.perf_counter() - started
    figures[f"{name}_explain_rel_l2_vs_zennit"] = built.figures["rel_l2_vs_zennit"]
    for key in ("rel_l2_vs_zennit64", "zennit32_rel_l2_vs_zennit64"):
        if key in built.figures:
            figures[f"{name}_explain_{key}"] = built.figures[key]
    explain = session(graph.SerializeToString(), threads=1, cuda=False)
    predict = session(torch_to_onnx(model, probe).SerializeToString(), threads=1, cuda=False)
    times = {b: {"zennit": [], "onnx": [], "predict": []} for b in (1, 16)}
    budget_end = time.perf_counter() + SECONDS_PER_MODEL
    rounds = 0
    with LRP(model, check=False) as lrp:
        lrp(torch.from_numpy(b1))  # warm both sides
        explain.run(None, {"input": b1, "target": np.full(1, -1, np.int64)})
        while rounds < max_rounds and (rounds < 2 or time.perf_counter() < budget_end):
            for b, x in ((1, b1), (16, b16)):
                tensor, feed = torch.from_numpy(x), {"input": x, "target": np.full(len(x), -1, np.int64)}
                _timed(lambda: lrp(tensor), times[b]["zennit"])
                _timed(lambda: explain.run(None, feed), times[b]["onnx"])
                _timed(lambda: predict.run(None, {"input": x}), times[b]["predict"])
            rounds += 1

    def paired(b, slow, fast):  # per round, then the median: a slow phase of the machine hits both of a pair alike
        return float(np.median(np.array(times[b][slow]) / np.array(times[b][fast])))
    figures[f"{name}_explain_speedup_vs_zennit_b1"] = paired(1, "zennit", "onnx")
    figures[f"{name}_explain_speedup_vs_zennit_b16"] = paired(16, "zennit", "onnx")
    figures[f"{name}_explain_over_predict_b16"] = paired(16, "onnx", "predict")
    figures[f"{name}_explain_over_predict_source"] = "onnx explain graph"
    figures[f"{name}_explain_ms_b1"] = 1000 * float(np.median(times[1]["onnx"]))
    figures[f"{name}_rounds"] = rounds
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures as one JSON object here")
    parser.add_argument("--models", nargs="+", default=list(MATRIX), choices=MATRIX)
    parser.add_argument("--rounds", type=int, default=10, help="most interleaved timing rounds per model (median reported)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--lrp-only", action="store_true", help="LRP figures only (conservation, canonization, deletion): no explain graph, no timing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures = {}
    for name in args.models:
        started = time.perf_counter()
        figures.update(measure(name, args.size, args.rounds, args.lrp_only))
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    figures["models_explained"] = sum(figures[f"{n}_explained"] for n in args.models)
    figures["models_with_explain_graph"] = sum(figures.get(f"{n}_explain_graph", 0) for n in args.models)
    figures["models"] = len(args.models)
    figures["worst_conservation_rel_err"] = max(figures[f"{n}_conservation_rel_err"] for n in args.models)
    kept = ("conservation_rel_err", "canonized_output_max_abs_diff") if args.lrp_only else TARGETS
    targets = {f"{n}_{k}": v for n in args.models for k, v in TARGETS.items() if k in kept}
    targets.update(models_explained=f"== {len(args.models)}", worst_conservation_rel_err="<= 1e-3")
    report(f"models: LRP on the model matrix at {args.size} px (canonization, conservation, explain graph)", figures, targets, args.json)


if __name__ == "__main__":
    main()
