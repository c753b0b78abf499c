"""Benchmark: a full `unhans audit` of backdoored MNIST-5k (4,000 training images, VGG-style model).

    python bench/audit.py [--json PATH] [--run DIR]

Keys: poisoned_class_rank (target 1), artifact_cluster_ari (target >= 0.9), audit_seconds_4000 (target <= 120 on 2
cores: relevance, SpRAy with t-SNE for all 10 classes, report and ViRelAy project), resume_recomputed_fraction
(target <= 0.05).

The resume figure comes from a real interruption: the audit runs as a child process that is SIGKILLed once half
of the relevance batches are stored; the audit is then resumed. Batches are committed atomically one by one and
computed in order, so what a kill can waste is the one batch in flight: the figure is that batch's share of the
samples, and the run checks that the resume computed exactly the batches missing at the kill, nothing more.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report
from sklearn.metrics import adjusted_rand_score

from unhans.audit.run import run_audit
from unhans.audit.spec import AuditSpec
from unhans.core.artifacts import Patch
from unhans.core.poison import load_scenario
from unhans.core.training import TrainSpec, train_run

TARGETS = {"poisoned_class_rank": "1", "artifact_cluster_ari": ">= 0.9", "audit_seconds_4000": "<= 120",
           "resume_recomputed_fraction": "<= 0.05"}


def _spec(run: Path, out: Path) -> AuditSpec:
    return AuditSpec(model_file=str(run / "model.py"), weights=str(run / "weights.pt"), data=str(run / "dataset.npz"), out_dir=str(out))


def measure(run: Path, scratch: Path) -> dict:
    if not (run / "weights.pt").exists():
        train_run(TrainSpec(data="mnist", architecture="vgg", mode="backdoor", fraction=0.1), Patch(), run)
    train, *_ = load_scenario(run / "dataset.npz")

    started = time.perf_counter()
    ranked = run_audit(_spec(run, scratch / "full"))
    figures = {"audit_seconds_4000": round(time.perf_counter() - started, 2), "n_samples": len(train)}
    figures["poisoned_class_rank"] = next(r.rank for r in ranked if r.class_index == train.target)
    poisoned = next(r for r in ranked if r.class_index == train.target)
    figures["artifact_cluster_ari"] = adjusted_rand_score(train.has_artifact[poisoned.indices], poisoned.labels)

    out = scratch / "interrupted"
    spec = _spec(run, out)
    child = subprocess.Popen([sys.executable, "-m", "unhans.cli", "audit", "--model", spec.model_file, "--weights", spec.weights,
                              "--data", spec.data, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = -(-len(train) // spec.batch_size)
    while len(list((out / "relevance").glob("batch-*.h5"))) < total // 2 and child.poll() is None:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    stored = len(list((out / "relevance").glob("batch-*.h5")))
    run_audit(spec)
    computed = json.loads((out / "audit.json").read_text())["computed_fraction_this_run"]
    assert round(computed * total) == total - stored, "the resume redid a batch that was already stored"
    figures["resume_stored_fraction_at_kill"] = round(stored / total, 3)
    figures["resume_recomputed_fraction"] = round(spec.batch_size / len(train), 4)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures as one JSON object here")
    parser.add_argument("--run", type=Path, help="run folder of the backdoored VGG (trained here if missing)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        figures = measure(args.run or Path(scratch) / "vgg", Path(scratch))
    report("audit: backdoored MNIST-5k, VGG-style, input relevance (EpsilonPlusFlat)", figures, TARGETS, args.json)

if __name__ == "__main__":
    main()
