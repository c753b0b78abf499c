"""Benchmark: the explanation core on backdoored MNIST-5k (VGG-style model) and SpRAy at scale.

    python bench/science.py [--json PATH] [--run DIR] [--skip-scale]

Trains (or reuses, with --run) the backdoored VGG-style model of bench/training.py, then measures:
SpRAy on class-wise input relevance (ARI of the target class's clusters against the poisoned samples, rank of the
poisoned class), P-ClArC (plain and reactive) and A-ClArC (clean accuracy, attack success), the share of relevance
on the artifact before and after P-ClArC, and SpRAy's speed and memory against CoRelAy (bench/science_spray.py).
The CAV is fitted on the training samples known to carry the artifact against all other training samples, at
the last max-pool (features.pool2, flattened), pattern method.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import report
from science_spray import measure as measure_spray_scale
from sklearn.metrics import adjusted_rand_score

from unhans.core.artifacts import Patch
from unhans.core.attribution import LRP, relevance_share
from unhans.core.clarc import aclarc, fit_cav, pclarc
from unhans.core.spray import rank_classes
from unhans.core.training import TrainSpec, attack_success, clean_accuracy, load_run, train_run


LAYER = "features.pool2"
TARGETS = {
    "spray_ari": ">= 0.9", "poisoned_class_rank": "1",
    "attack_success_after_pclarc": "<= 0.1 x before", "clean_acc_after_pclarc": ">= before - 0.01",
    "clean_acc_after_reactive": ">= before - 0.003", "attack_success_after_reactive": "<= 0.1 x before",
    "spray_speedup_vs_corelay_10k": ">= 10", "spray_seconds_100k": "<= 60", "spray_peak_mb_100k": "<= 4000",
    "corelay_eigenvalue_max_abs_diff": "<= 1e-4",
}


def measure_backdoor(run_dir: Path) -> dict:
    if not (run_dir / "weights.pt").exists():
        train_run(TrainSpec(data="mnist", architecture="vgg", mode="backdoor", fraction=0.1), Patch(), run_dir)
    model, train, test, attack, artifact = load_run(run_dir)
    target = train.target
    figures = {"clean_acc_before": clean_accuracy(model, test), "attack_success_before": attack_success(model, attack, target)}

    # SpRAy per class on the input relevance of the class each sample is labelled with
    relevance = LRP(model).explain(train.images, target=train.labels, show_progress=True).relevance
    ranking = rank_classes(relevance, train.labels)
    figures["poisoned_class_rank"] = next(i + 1 for i, r in enumerate(ranking) if r.class_index == target)
    poisoned = next(r for r in ranking if r.class_index == target)
    figures["spray_ari"] = adjusted_rand_score(train.has_artifact[train.labels == target], poisoned.labels)

    cav = fit_cav(model, LAYER, train.images[train.has_artifact], train.images[~train.has_artifact])
    corrected = pclarc(model, LAYER, cav)
    reactive = pclarc(model, LAYER, cav, reactive=True)
    tuned = aclarc(model, train, artifact, fraction=0.5, epochs=2, lr=1e-3)
    for name, variant in (("pclarc", corrected), ("reactive", reactive), ("aclarc", tuned)):
        figures[f"clean_acc_after_{name}"] = clean_accuracy(variant, test)
        figures[f"attack_success_after_{name}"] = attack_success(variant, attack, target)

    # relevance for the target class on attacked images: how much of it the artifact draws, before and after
    figures["artifact_relevance_share_before"] = relevance_share(LRP(model).explain(attack.images, target=target).relevance, attack.masks)
    figures["artifact_relevance_share_after"] = relevance_share(LRP(corrected).explain(attack.images, target=target).relevance, attack.masks)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures as one JSON object here")
    parser.add_argument("--run", type=Path, help="run folder of the backdoored VGG (trained here if missing)")
    parser.add_argument("--skip-scale", action="store_true", help="leave out the CoRelAy and 100k SpRAy figures")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        figures = measure_backdoor(args.run or Path(scratch) / "vgg")
    if not args.skip_scale:
        figures.update(measure_spray_scale())

    report("explanation core: backdoored MNIST-5k (VGG-style), SpRAy at scale", figures, TARGETS, args.json)

if __name__ == "__main__":
    main()
