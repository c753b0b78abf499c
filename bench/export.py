"""Benchmark: the cost and exactness of P-ClArC baked into ONNX, for VGG and ResNet, flat and per-channel.

    python bench/export.py [--vgg-run DIR] [--resnet-run DIR] [--json PATH] [--rounds N]

Without run folders it trains both backdoored MNIST-5k models first (as bench/training.py does). Per model and mode:
a pattern CAV (artifact samples vs all clean samples) at the layer that feeds the classifier, exported folded and
unfolded (no detector output, so only the correction is timed). Overhead is the median over interleaved rounds in
this one process of (corrected time / uncorrected time − 1), same session options, 1 intra-op thread, batch 1 and
32. Exactness: max |onnxruntime − PyTorch P-ClArC| over the clean and attacked test sets, and accuracy / attack
success of both.

Keys: {vgg,resnet}_{flat,channel}_{overhead_pct_folded_b1, ..._unfolded_b32, max_abs_diff_vs_torch, ...} and the
issue's plain keys, each the worst case over models and modes (folded keys over the cases that fold: ResNet in
flat mode cannot, global average pooling mixes positions the flat projection keeps apart). overhead_pct_null_*
times a second session on the uncorrected graph the same way: the method's noise floor. Targets: folded
overhead <= 1 %, unfolded <= 5 %, max abs diff <= 1e-4, ONNX accuracy and attack success equal to PyTorch's
to 0.001.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from common import report

from unhans.core.artifacts import Patch
from unhans.core.clarc import fit_cav, pclarc
from unhans.core.training import TrainSpec, load_run, predict, train_run
from unhans.export.correction import Correction
from unhans.export.onnx import export_torch, torch_to_onnx
from unhans.export.runtime import interleaved_overhead, run_batched, session

LAYERS = {"vgg": "features.pool2", "resnet": "features.layer3"}
MODES = ("flat", "channel")
BATCHES = (1, 32)


def bench_case(arch: str, mode: str, run_dir: Path, scratch: Path, rounds: int) -> dict:
    model, train, test, attack, _ = load_run(run_dir)
    layer = LAYERS[arch]
    artifact, clean = train.images[train.has_artifact], train.images[~train.has_artifact]
    cav = fit_cav(model, layer, artifact, clean, mode=mode)
    correction = Correction.from_cav(cav, detector=False)
    probe = np.concatenate([artifact[:32], clean[:32]])
    out = {}
    paths = {}
    for fold in (True, False):
        kind = "folded" if fold else "unfolded"
        paths[kind] = scratch / f"{arch}_{mode}_{kind}.onnx"
        report = export_torch(model, layer, correction, probe, paths[kind], fold=fold)
        out[f"export_seconds_{kind}"] = report.seconds
        out[f"nodes_added_{kind}"] = report.nodes_after - report.nodes_before
        if fold:
            out["folded"] = report.folded

    images = np.concatenate([test.images, attack.images])
    reference = pclarc(model, layer, cav)
    with torch.no_grad():
        expected = np.concatenate([reference(torch.from_numpy(images[i : i + 500])).numpy() for i in range(0, len(images), 500)])
    torch_pred = expected.argmax(1)
    n_test = len(test)
    out["torch_clean_acc_after"] = float((torch_pred[:n_test] == test.labels).mean())
    out["torch_attack_success_after"] = float((torch_pred[n_test:] == train.target).mean())
    out["clean_acc_before"] = float((predict(model, test.images) == test.labels).mean())
    out["attack_success_before"] = float((predict(model, attack.images) == train.target).mean())
    for kind, path in paths.items():
        logits = run_batched(session(path, cuda=False), images)[0]
        out[f"max_abs_diff_vs_torch_{kind}"] = float(np.abs(logits - expected).max())
        pred = logits.argmax(1)
        out[f"onnx_clean_acc_after_{kind}"] = float((pred[:n_test] == test.labels).mean())
        out[f"onnx_attack_success_after_{kind}"] = float((pred[n_test:] == train.target).mean())
    out["logit_scale"] = float(np.abs(expected).max())

    plain = torch_to_onnx(model, probe).SerializeToString()
    # "null": a second session on the uncorrected graph, timed like the others: the noise floor of the method
    sessions = {"plain": session(plain, cuda=False), "null": session(plain, cuda=False),
                **{kind: session(path, cuda=False) for kind, path in paths.items()}}
    for batch in BATCHES:
        overhead = interleaved_overhead(sessions, np.ascontiguousarray(test.images[:batch]), rounds)
        for kind in ("null", *paths):
            out[f"overhead_pct_{kind}_b{batch}"] = overhead[kind]
    return out


TARGETS = {"overhead_pct_folded_b1": "<= 1", "overhead_pct_folded_b32": "<= 1", "overhead_pct_unfolded_b1": "<= 5",
           "overhead_pct_unfolded_b32": "<= 5", "overhead_pct_null_b1": "noise", "overhead_pct_null_b32": "noise",
           "max_abs_diff_vs_torch": "<= 1e-4", "onnx_attack_success_after": "", "onnx_clean_acc_after": "",
           "onnx_vs_torch_accuracy_gap": "<= 0.001", "export_seconds": ""}


def summarise(cases: dict[tuple[str, str], dict]) -> dict:
    """Flat JSON: every figure per model and mode, then the issue's keys as the worst case over them."""
    results = {}
    for (arch, mode), c in cases.items():
        prefix = f"{arch}_{mode}_"
        for batch in BATCHES:
            results[f"{prefix}overhead_pct_folded_b{batch}"] = c[f"overhead_pct_folded_b{batch}"] if c["folded"] else None
            results[f"{prefix}overhead_pct_unfolded_b{batch}"] = c[f"overhead_pct_unfolded_b{batch}"]
            results[f"{prefix}overhead_pct_null_b{batch}"] = c[f"overhead_pct_null_b{batch}"]
        results[f"{prefix}folded"] = c["folded"]
        results[f"{prefix}nodes_added_folded"] = c["nodes_added_folded"]
        results[f"{prefix}nodes_added_unfolded"] = c["nodes_added_unfolded"]
        results[f"{prefix}max_abs_diff_vs_torch"] = max(c["max_abs_diff_vs_torch_folded"], c["max_abs_diff_vs_torch_unfolded"])
        results[f"{prefix}logit_scale"] = c["logit_scale"]
        for figure in ("clean_acc", "attack_success"):
            results[f"{prefix}{figure}_before"] = c[f"{figure}_before"]
            results[f"{prefix}torch_{figure}_after"] = c[f"torch_{figure}_after"]
            results[f"{prefix}onnx_{figure}_after"] = c[f"onnx_{figure}_after_folded"]
            results[f"{prefix}onnx_vs_torch_{figure}_gap"] = max(abs(c[f"onnx_{figure}_after_{k}"] - c[f"torch_{figure}_after"]) for k in ("folded", "unfolded"))
        results[f"{prefix}export_seconds"] = max(c["export_seconds_folded"], c["export_seconds_unfolded"])
    worst = {}
    for batch in BATCHES:
        worst[f"overhead_pct_folded_b{batch}"] = max(c[f"overhead_pct_folded_b{batch}"] for c in cases.values() if c["folded"])
        worst[f"overhead_pct_unfolded_b{batch}"] = max(c[f"overhead_pct_unfolded_b{batch}"] for c in cases.values())
        worst[f"overhead_pct_null_b{batch}"] = max(abs(c[f"overhead_pct_null_b{batch}"]) for c in cases.values())
    worst["max_abs_diff_vs_torch"] = max(results[f"{a}_{m}_max_abs_diff_vs_torch"] for a, m in cases)
    worst["onnx_attack_success_after"] = max(results[f"{a}_{m}_onnx_attack_success_after"] for a, m in cases)
    worst["onnx_clean_acc_after"] = min(results[f"{a}_{m}_onnx_clean_acc_after"] for a, m in cases)
    worst["onnx_vs_torch_accuracy_gap"] = max(max(results[f"{a}_{m}_onnx_vs_torch_{f}_gap"] for f in ("clean_acc", "attack_success")) for a, m in cases)
    worst["export_seconds"] = max(results[f"{a}_{m}_export_seconds"] for a, m in cases)
    return {**results, **worst}


def show(results: dict, cases) -> None:
    console = Console()
    table = Table(title="P-ClArC in ONNX: overhead vs the uncorrected graph (onnxruntime, 1 thread); exactness vs PyTorch")
    table.add_column("figure")
    for arch, mode in cases:
        table.add_column(f"{arch} {mode}", justify="right")
    pct = lambda v: "n/a" if v is None else f"{v:+.2f}"
    rows = {
        "folds": lambda p: str(results[p + "folded"]),
        "nodes + fold/ops": lambda p: f"{results[p + 'nodes_added_folded']}/{results[p + 'nodes_added_unfolded']}",
        **{f"{label} b{b} %": (lambda p, k=kind, b=b: pct(results[f"{p}overhead_pct_{k}_b{b}"]))
           for kind, label in (("folded", "fold"), ("unfolded", "ops"), ("null", "null")) for b in BATCHES},
        "max |onnx-torch|": lambda p: f"{results[p + 'max_abs_diff_vs_torch']:.1e}",
        "clean before": lambda p: f"{results[p + 'clean_acc_before']:.3f}",
        "clean onnx/torch": lambda p: f"{results[p + 'onnx_clean_acc_after']:.3f}/{results[p + 'torch_clean_acc_after']:.3f}",
        "attack before": lambda p: f"{results[p + 'attack_success_before']:.3f}",
        "attack onnx/torch": lambda p: f"{results[p + 'onnx_attack_success_after']:.3f}/{results[p + 'torch_attack_success_after']:.3f}",
        "export s": lambda p: f"{results[p + 'export_seconds']:.1f}",
    }
    for label, cell in rows.items():
        table.add_row(label, *(cell(f"{arch}_{mode}_") for arch, mode in cases))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vgg-run", type=Path, help="run folder of a backdoored VGG (default: train one)")
    parser.add_argument("--resnet-run", type=Path, help="run folder of a backdoored ResNet (default: train one)")
    parser.add_argument("--json", type=Path, help="write the figures as one JSON object here")
    parser.add_argument("--rounds", type=int, default=101, help="interleaved timing rounds per batch size")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the timed graphs get 1 thread each; torch must not compete with them

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        runs = {"vgg": args.vgg_run, "resnet": args.resnet_run}
        for arch, run in runs.items():
            if run is None:
                runs[arch] = scratch / arch
                train_run(TrainSpec(data="mnist", architecture=arch), Patch(), runs[arch])
        cases = {(arch, mode): bench_case(arch, mode, runs[arch], scratch, args.rounds) for arch in LAYERS for mode in MODES}
    results = summarise(cases)
    show(results, cases)
    report("worst case over models and modes", {key: results[key] for key in TARGETS}, TARGETS, None)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
