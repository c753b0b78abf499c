"""Benchmark: LRP as an ONNX graph (unhans.export.explain) against zennit, on the backdoored MNIST-5k runs.

    python bench/explain.py [--json PATH] [--vgg-run DIR] [--resnet-run DIR] [--rounds N]

Per architecture (vgg, resnet): {arch}_rel_l2_vs_zennit_b1/_b16 (relative L2 of the input relevance, predicted
class; _vs_zennit64 against zennit in float64, and zennit32_rel_l2_vs_zennit64 zennit's own float32 error, which is
larger where LRP of a model is ill-conditioned), {arch}_speedup_vs_zennit_b1/_b16 (zennit LRP with hooks kept
registered, torch 1 thread, over the explain graph in onnxruntime, 1 thread; target >= 3), {arch}_explain_over_predict_b16 (explain graph over prediction graph,
both onnxruntime), {arch}_export_seconds (trace, export and verification). Plain keys give the worst of the two.
Both sides are timed interleaved in one process, round by round; each figure is the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import report

from unhans.core.artifacts import Patch
from unhans.core.attribution import LRP
from unhans.core.training import TrainSpec, load_run, train_run
from unhans.export.explain import _rel_l2, _relevance64, explain_graph
from unhans.export.onnx import torch_to_onnx
from unhans.export.runtime import session

TARGETS = {"rel_l2_vs_zennit": "<= 1e-4", "speedup_vs_zennit_b1": ">= 3", "speedup_vs_zennit_b16": ">= 3"}
DEFAULT_RUNS = {"vgg": Path("/tmp/benchruns/vgg"), "resnet": Path("/tmp/benchruns/resnet")}


def _timed(fn, times: list) -> None:
    """Append the wall time of one call of ``fn``."""
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)


def measure(arch: str, run: Path, rounds: int) -> dict:
    model, _, test, attack, _ = load_run(run)
    probe = np.concatenate([attack.images[:16], test.images[:16]])
    started = time.perf_counter()
    graph = explain_graph(model, "epsilon_plus_flat", probe=probe)
    export_seconds = time.perf_counter() - started
    explain = session(graph.SerializeToString(), threads=1, cuda=False)
    predict = session(torch_to_onnx(model, probe).SerializeToString(), threads=1, cuda=False)
    lrp = LRP(model, "epsilon_plus_flat")
    batches = {1: test.images[:1], 16: test.images[16:32]}
    figures, times = {}, {}
    with LRP(model, "epsilon_plus_flat") as lrp64:
        lrp64.model.double()
        for b, x in batches.items():
            feed = {"input": x, "target": np.full(len(x), -1, np.int64)}
            expected = lrp(torch.from_numpy(x))
            got = explain.run(["relevance"], feed)[0]
            reference = _relevance64(lrp64, x, expected.targets)
            figures[f"{arch}_rel_l2_vs_zennit_b{b}"] = _rel_l2(got, expected.relevance)
            figures[f"{arch}_rel_l2_vs_zennit64_b{b}"] = _rel_l2(got, reference)
            figures[f"{arch}_zennit32_rel_l2_vs_zennit64_b{b}"] = _rel_l2(expected.relevance, reference)
            times[b] = {"zennit": [], "onnx": [], "predict": []}
    for _ in range(rounds):
        for b, x in batches.items():
            tensor, feed = torch.from_numpy(x), {"input": x, "target": np.full(len(x), -1, np.int64)}
            _timed(lambda: lrp(tensor), times[b]["zennit"])
            _timed(lambda: explain.run(None, feed), times[b]["onnx"])
            _timed(lambda: predict.run(None, {"input": x}), times[b]["predict"])
    lrp.close()
    def paired(b, slow, fast):  # per round, then the median: a slow phase of the machine hits both of a pair alike
        return float(np.median(np.array(times[b][slow]) / np.array(times[b][fast])))
    for b in batches:
        figures[f"{arch}_speedup_vs_zennit_b{b}"] = paired(b, "zennit", "onnx")
    figures[f"{arch}_explain_over_predict_b16"] = paired(16, "onnx", "predict")
    figures[f"{arch}_export_seconds"] = export_seconds
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures as one JSON object here")
    parser.add_argument("--vgg-run", type=Path, default=DEFAULT_RUNS["vgg"] if DEFAULT_RUNS["vgg"].is_dir() else None)
    parser.add_argument("--resnet-run", type=Path, default=DEFAULT_RUNS["resnet"] if DEFAULT_RUNS["resnet"].is_dir() else None)
    parser.add_argument("--rounds", type=int, default=100, help="interleaved timing rounds (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        for arch, run in (("vgg", args.vgg_run), ("resnet", args.resnet_run)):
            if run is None:  # no trained run given: train the backdoored MNIST-5k one here
                run = Path(scratch) / arch
                train_run(TrainSpec(data="mnist", architecture=arch), Patch(), run, show_progress=False)
            figures.update(measure(arch, run, args.rounds))
    archs = ("vgg", "resnet")
    figures["rel_l2_vs_zennit"] = max(figures[f"{a}_rel_l2_vs_zennit_b{b}"] for a in archs for b in (1, 16))
    figures["speedup_vs_zennit_b1"] = min(figures[f"{a}_speedup_vs_zennit_b1"] for a in archs)
    figures["speedup_vs_zennit_b16"] = min(figures[f"{a}_speedup_vs_zennit_b16"] for a in archs)
    figures["explain_over_predict_b16"] = max(figures[f"{a}_explain_over_predict_b16"] for a in archs)
    figures["export_seconds"] = max(figures[f"{a}_export_seconds"] for a in archs)
    report("explain: LRP (EpsilonPlusFlat) as an ONNX graph vs zennit, backdoored MNIST-5k", figures, TARGETS, args.json)


if __name__ == "__main__":
    main()
