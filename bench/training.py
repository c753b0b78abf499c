"""Benchmark: backdoored MNIST-5k at 10% poisoning, VGG-style and ResNet-style, trained on this machine's CPU.

    python bench/training.py [--json PATH] [--out DIR]

Keys: vgg_clean_acc, vgg_attack_success, resnet_clean_acc, resnet_attack_success, vgg_train_seconds,
resnet_train_seconds. Targets (issue 2): VGG >= 0.96 / >= 0.95 in <= 180 s on 2 cores; ResNet >= 0.95 / >= 0.90.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


from common import report

from unhans.core.artifacts import Patch
from unhans.core.training import TrainSpec, train_run

TARGETS = {
    "vgg_clean_acc": ">= 0.96", "vgg_attack_success": ">= 0.95", "vgg_train_seconds": "<= 180",
    "resnet_clean_acc": ">= 0.95", "resnet_attack_success": ">= 0.90", "resnet_train_seconds": "",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures as one JSON object here")
    parser.add_argument("--out", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or Path(scratch)
        for architecture in ("vgg", "resnet"):
            spec = TrainSpec(data="mnist", architecture=architecture, mode="backdoor", fraction=0.1, seed=args.seed)
            metrics = train_run(spec, Patch(), root / architecture)
            results[f"{architecture}_clean_acc"] = metrics["clean_acc"]
            results[f"{architecture}_attack_success"] = metrics["attack_success"]
            results[f"{architecture}_train_seconds"] = metrics["train_seconds"]

    report("training: backdoored MNIST-5k, 10% poisoning, 5x5 checker patch", results, TARGETS, args.json)

if __name__ == "__main__":
    main()
