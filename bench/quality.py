"""Benchmark: the scenario grid of issue 18. Does audit -> the tool's own cluster -> export hold beyond the corner patch?

    python bench/quality.py [--json PATH] [--cells SUBSTRING ...] [--seeds N ...] [--keep DIR] [--quick]
                            [--epochs N] [--workers N] [--export-args "--reactive ..."] [--architecture resnet]

Every cell runs the pipeline exactly as a user would, through the real CLI (one subprocess per step, OMP_NUM_THREADS=1
each, ``--workers`` cells at a time, 2 by default: one per core):

    unhans train  --out R --data mnist --poison MODE --artifact ... --fraction F --epochs E --seed S
    unhans audit  --run R --out A --select auto          (exit 2 "no artifact found": the cell fails, the grid goes on)
    unhans export --run R --layer features.pool2 --samples A/samples.npz --out C.onnx   (exit 2: refused, recorded)

except where the audit found that the artifact moves or has no place (A/artifact-region.json's ``route`` is
``samples``): there the cell runs the commands the audit printed instead. For one that moves, on this VGG (no global
pooling), A-ClArC and then the export:

    unhans aclarc --run R --samples A/samples.npz --out R-aclarc
    unhans export --run R-aclarc --layer features --samples A/samples.npz --reactive --out C.onnx

for one spread over the image (stripes, a cast, a frame), the export from the selected rows at the layer it analysed.
Every export judges its correction on the artifact before writing it (export/effect.py) and refuses one that removes
less than half of its effect: that is an ``export_refused`` too.

then scores the corrected graph C.onnx with onnxruntime on the run's clean test set and attacked test set, against
the uncorrected model's figures.

``--architecture resnet`` trains SmallResNet (global average pooling) instead of the VGG in every cell, named with
``_resnet``; its cells run the audit's printed commands whatever the route, since ``LAYER`` is the VGG's.
``--architecture vit`` does the same with the small vision transformer (``unhans train --model vit``), whose audit
prints its corrections at the patch embedding.

Grid (42 cells) = artifacts x modes x rates:

- artifacts: ``patch`` (5x5 checker patch in the bottom-right corner), ``text`` ("©" tag, 10 px, bottom-right),
  ``frame`` (2-px border frame), ``textrandom`` ("©" tag at a random position in every image), ``line`` (a 1-px
  diagonal line, 10 px, bottom-right), ``stripes`` (every 3rd row of the whole image at 30% white: a texture with no
  place), ``cast`` (the red channel lifted by 15% over the whole image, on ``mnist-rgb``: MNIST-5k's digits each in a
  colour of its own);
- modes: ``backdoor`` (pasted into other classes' images, relabelled to the target class 0) and ``cooccurrence``
  (pasted into class 0's own images, labels kept);
- rates 2%, 5%, 10%. For backdoor the rate is ``--fraction`` (share of each of the 9 other classes' training images:
  72 / 180 / 360 poisoned rows, as in the issue's table). For co-occurrence the same number of rows is poisoned, all
  of them in class 0: ``--fraction`` 9x the rate (18% / 45% / 90% of class 0's 400 training images); ``--fraction``
  = the rate would poison only 8 / 20 / 40 images, which the model does not learn to rely on.

What was shortened: training runs 5 epochs (co-occurrence 8) instead of the CLI's default 12 (``--epochs``), which keeps the grid within
45 minutes on 2 cores (measured per cell at 4 epochs: train 81, audit 87, export 32 CPU seconds; an epoch about 11: 24
cells at 5 epochs are about 88 CPU minutes, 44 on 2 cores); attack success before the correction (``*_attack_success_before``, from the run's
metrics.json) shows whether the model still learned the artifact. ``--quick`` runs 4 cells (patch and frame backdoor at
5%, textrandom backdoor and text co-occurrence at 10%) with 4 epochs. Everything else is the CLI's defaults.

Per scenario (keys prefixed by its name, e.g. ``patch_backdoor_05_``, ``_s1`` added for seed 1): ``learned``
(attack success before >= 0.2), ``rank`` (rank of the poisoned/target class in audit.json's ranking, 1 = most suspicious), ``artifact_found``
(--select auto found a marked cluster), ``chosen_class``, ``cluster_precision`` / ``cluster_recall`` (the rows of
A/samples.npz, i.e. the chosen cluster, against the training rows that truly carry the artifact; the audit of
``--run R`` analyses R/dataset.npz's training set row by row, which is checked; no artifact found = 0 / 0),
``poisoned_rows``, ``attack_success_before`` / ``_after`` (share of the attacked test set, every non-target test
image with the artifact pasted, predicted as the target: metrics.json's definition in both modes, core/training.py
``attack_success``), ``attack_success_cut`` ((before - after) / before), ``clean_acc_before`` / ``_after`` (clean
test set), ``clean_drop_pt`` (points), ``export_refused`` (export's or A-ClArC's cost check, or export's check of the
artifact's effect, refused to write), ``graph_written``, ``effect_removed`` (the share of the artifact's effect the
written graph's export measured it removes, its metadata ``unhans.effect.removed``; None: not judged),
``ineffective_correction_written`` (a graph written whose attack-success cut is under ``MIN_CUT_WRITTEN``), ``correction_route``
(``grid`` or ``audit``, see above),
``meets_all_targets``, ``seconds`` (train + audit + export + scoring, wall clock), ``cpu_seconds`` (CPU time of the
three commands, as the kernel counts it: what the cell costs however busy the machine is). Where nothing was exported (no artifact
found, export refused) the deployed model is the uncorrected one: after = before, cut 0.

Summary keys: ``scenarios`` (cells run, seeds counted), ``worst_rank`` (target 1), ``worst_cluster_precision`` and
``worst_cluster_recall`` (targets >= 0.9), ``worst_attack_success_cut`` (target >= 0.9), ``worst_clean_drop_pt``
(target <= 1.0), ``scenarios_meeting_all_targets`` (target: every learned scenario), ``scenarios_learned`` and
``scenarios_not_learned`` (cells whose model does not follow the artifact, attack success before < 0.2: there is no
Clever Hans to find or cut, so they are left out of the worst rank, precision, recall and cut, not of the worst clean
drop, and never count as meeting the targets; the table marks them), ``scenarios_failed`` (a step crashed; its figures are missing),
``export_refusals``, ``ineffective_corrections_written`` (graphs written whose attack-success cut is under 50%: target
0 over the whole grid), ``no_artifact_found``, ``grid_minutes`` (wall clock) and ``grid_cpu_minutes`` (half of it is what the
grid takes on 2 idle cores with 2 workers).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import report

from unhans.core.poison import load_scenario
from unhans.core.run_folder import DATASET_FILE, METRICS_FILE
from unhans.export.runtime import run_batched, session

TARGETS = {"worst_rank": "1", "worst_cluster_precision": ">= 0.9", "worst_cluster_recall": ">= 0.9",
           "worst_attack_success_cut": ">= 0.9", "worst_clean_drop_pt": "<= 1.0",
           "scenarios_meeting_all_targets": "every learned scenario (scenarios_learned)", "scenarios_failed": "0",
           "ineffective_corrections_written": "0"}

ARTIFACTS = {
    "patch": ["--artifact", "patch"],
    "text": ["--artifact", "text"],
    "frame": ["--artifact", "frame"],
    "textrandom": ["--artifact", "text", "--position", "random"],
    "line": ["--artifact", "line"],
    "stripes": ["--artifact", "stripes"],
    "cast": ["--artifact", "cast"],
}
DATA = {"cast": "mnist-rgb"}  # the data of artifacts that need other than MNIST-5k's grey digits (`unhans train --data`)
MIN_CUT_WRITTEN = 0.5  # a graph written whose attack-success cut is under this is an ineffective correction (target: none)
MODES = ("backdoor", "cooccurrence")
RATES = (0.02, 0.05, 0.10)
GRID_MODEL = "vgg"  # the grid's model; another (`--architecture resnet`) is corrected as its audit prints
LAYER = "features.pool2"  # the VGG's last max-pool, the layer the README exports at
EPOCHS, QUICK_EPOCHS = 5, 4
COOCCURRENCE_EXTRA_EPOCHS = 3  # a tag on the class's own images is learned slowly: 8% attack success at 4 epochs, 27% at 8
QUICK_CELLS = ("patch_backdoor_05", "frame_backdoor_05", "textrandom_backdoor_10", "text_cooccurrence_10")
MIN_LEARNED = 0.2  # attack success before below this: the model does not follow the artifact, there is nothing to cut
NO_ARTIFACT_EXIT = 2  # `unhans audit --select auto` / a refused `unhans export`: one line on stderr, exit status 2
CLI = [sys.executable, "-m", "unhans.cli"]
STARTED = time.perf_counter()
_print_lock = threading.Lock()


def say(text: str) -> None:
    with _print_lock:
        print(f"[{time.perf_counter() - STARTED:6.0f} s] {text}", flush=True)


@dataclass(frozen=True)
class Cell:
    artifact: str
    mode: str
    rate: float
    seed: int = 0
    architecture: str = GRID_MODEL  # `unhans train --model`

    @property
    def name(self) -> str:
        return (f"{self.artifact}_{self.mode}_{round(100 * self.rate):02d}" + (f"_s{self.seed}" if self.seed else "")
                + ("" if self.architecture == GRID_MODEL else f"_{self.architecture}"))

    @property
    def fraction(self) -> float:
        """``--fraction``: the rate itself for backdoor; for co-occurrence as many poisoned rows, all in the target class."""
        return self.rate if self.mode == "backdoor" else round(9 * self.rate, 4)

    def epochs(self, epochs: int) -> int:
        """The training epochs of this cell for the grid's ``epochs``."""
        return epochs + COOCCURRENCE_EXTRA_EPOCHS if self.mode == "cooccurrence" else epochs

    def train_args(self, out: Path, epochs: int) -> list[str]:
        model = [] if self.architecture == GRID_MODEL else ["--model", self.architecture]  # the grid's: the CLI's default
        return ["train", "--out", str(out), "--data", DATA.get(self.artifact, "mnist"), *model, "--poison", self.mode, *ARTIFACTS[self.artifact],
                "--fraction", str(self.fraction), "--epochs", str(self.epochs(epochs)), "--seed", str(self.seed)]


def grid(patterns: list[str] | None = None, seeds: list[int] | None = None, quick: bool = False,
         architecture: str = GRID_MODEL) -> list[Cell]:
    """The cells to run: the whole grid (or QUICK_CELLS), filtered by name substrings, once per seed."""
    cells = [Cell(a, m, r) for a in ARTIFACTS for m in MODES for r in RATES]
    if quick and not patterns:
        patterns = list(QUICK_CELLS)
    if patterns:
        cells = [c for c in cells if any(p in c.name for p in patterns)]
    return [Cell(c.artifact, c.mode, c.rate, s, architecture) for c in cells for s in (seeds or [0])]


def _cli(args: list[str], log: Path) -> subprocess.CompletedProcess:
    """One ``unhans`` command with one thread per process; its output goes to ``log``, its CPU seconds (user + system,
    from the kernel's record of the child, independent of how busy the machine is) to ``.cpu_seconds``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "120"}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen([*CLI, *args], stdout=stdout, stderr=stderr, text=True, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        done = subprocess.CompletedProcess(args, child.returncode, stdout.read(), stderr.read())
    done.cpu_seconds = usage.ru_utime + usage.ru_stime
    log.write_text(f"$ unhans {shlex.join(args)}\n(exit status {done.returncode}, {done.cpu_seconds:.1f} CPU seconds)\n\n"
                   f"{done.stdout}\n{done.stderr}")
    return done


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {done.returncode}"


def _train(cell: Cell, run: Path, epochs: int, log: Path) -> tuple[dict, float | None]:
    """Train the cell's run into ``run``, or reuse one trained there with exactly these arguments (``--keep``)."""
    args = cell.train_args(run, epochs)
    stamp = run / "bench-args.json"
    if stamp.is_file() and (run / METRICS_FILE).is_file() and json.loads(stamp.read_text()) == args:
        return json.loads((run / METRICS_FILE).read_text()), None
    done = _cli(args, log)
    if done.returncode != 0:
        raise RuntimeError(f"unhans train: {_last_line(done)} (log: {log})")
    stamp.write_text(json.dumps(args))
    return json.loads((run / METRICS_FILE).read_text()), done.cpu_seconds


def _predict(graph: Path, images: np.ndarray) -> np.ndarray:
    return run_batched(session(graph, threads=1, cuda=False), images, ["logits"])[0].argmax(1)


def _correction_commands(cell: Cell, audit: Path, run: Path, graph: Path, export_args: list[str]) -> tuple[str, list[list[str]]]:
    """How the cell is corrected, and the commands: ``grid``, the export from the selected samples at ``LAYER``, except
    where the audit found that the artifact moves (its region's route ``samples``) or the model is not the grid's;
    there ``audit``, the commands the audit printed, as a user would paste them (on the VGG without global pooling,
    A-ClArC then export), writing ``graph``."""
    region = audit / "artifact-region.json"
    info = json.loads(region.read_text()) if region.is_file() else {}
    if info.get("route") != "samples" and cell.architecture == GRID_MODEL:
        return "grid", [["export", "--run", str(run), "--layer", LAYER, "--samples", str(audit / "samples.npz"), "--out", str(graph), *export_args]]
    commands = []
    for line in info["commands"]:
        words = shlex.split(line)[1:]  # without "unhans"
        words = [str(graph) if word == "corrected.onnx" else word for word in words]
        commands.append(words + (list(export_args) if words[0] == "export" else []))
    return "audit", commands


def run_cell(cell: Cell, folder: Path, epochs: int = EPOCHS, export_args: list[str] = ()) -> dict:
    """Train, audit (--select auto), export and score one cell in ``folder``; returns its figures (unprefixed)."""
    folder.mkdir(parents=True, exist_ok=True)
    run, audit, graph = folder / "run", folder / "audit", folder / "corrected.onnx"
    out: dict = {}
    started = time.perf_counter()
    metrics, cpu = _train(cell, run, epochs, folder / "train.log")
    reused = cpu is None
    out["seconds_train"] = 0.0 if reused else round(time.perf_counter() - started, 1)
    out["cpu_seconds_train"] = round(cpu or 0.0, 1)
    train, test, attack, _ = load_scenario(run / DATASET_FILE)
    target = train.target
    out["poisoned_rows"] = int(train.has_artifact.sum())
    out["clean_acc_before"], out["attack_success_before"] = metrics["clean_acc"], metrics["attack_success"]
    say(f"{cell.name}: trained{' (reused)' if reused else ''} in {out['seconds_train']:.0f} s, clean accuracy "
        f"{out['clean_acc_before']:.3f}, attack success {out['attack_success_before']:.3f}, {out['poisoned_rows']} poisoned rows")

    step = time.perf_counter()
    if audit.exists():  # a kept folder: audit again from scratch, the code may have changed since
        import shutil

        shutil.rmtree(audit)
    done = _cli(["audit", "--run", str(run), "--out", str(audit), "--select", "auto"], folder / "audit.log")
    out["seconds_audit"], out["cpu_seconds_audit"] = round(time.perf_counter() - step, 1), round(done.cpu_seconds, 1)
    none_found = done.returncode == NO_ARTIFACT_EXIT and "no artifact" in done.stderr
    if (done.returncode != 0 and not none_found) or not (audit / "audit.json").is_file():
        raise RuntimeError(f"unhans audit: {_last_line(done)} (log: {folder / 'audit.log'})")
    ranking = json.loads((audit / "audit.json").read_text())
    if ranking["spec"]["data"] != str(run / DATASET_FILE) or sum(c["n"] for c in ranking["classes"]) != len(train):
        raise RuntimeError(f"the audit did not analyse {run / DATASET_FILE}'s {len(train)} training rows")
    entry = next(c for c in ranking["classes"] if c["class_index"] == target)
    out["rank"] = entry.get("rank") or len(ranking["classes"])  # a skipped class ranks last
    out["artifact_found"] = done.returncode == 0 and (audit / "samples.npz").is_file()
    if out["artifact_found"]:
        with np.load(audit / "samples.npz") as samples:
            rows = np.asarray(samples["artifact"])
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        hits = int(train.has_artifact[rows].sum())
        out["cluster_precision"] = round(hits / max(len(rows), 1), 4)
        out["cluster_recall"] = round(hits / max(out["poisoned_rows"], 1), 4)
        out["chosen_class"] = int(np.bincount(train.labels[rows]).argmax()) if len(rows) else None
        out["chosen_rows"] = int(len(rows))
    else:
        out.update(cluster_precision=0.0, cluster_recall=0.0, chosen_class=None, chosen_rows=0)
    say(f"{cell.name}: audited in {out['seconds_audit']:.0f} s, target class ranked {out['rank']}, "
        + (f"chose {out['chosen_rows']} rows of class {out['chosen_class']}: precision {out['cluster_precision']:.2f}, "
           f"recall {out['cluster_recall']:.2f}" if out["artifact_found"] else f"no artifact found ({_last_line(done)[:100]})"))

    out["export_refused"] = False
    out["seconds_export"] = out["cpu_seconds_export"] = 0.0
    exported = False
    out["correction_route"] = None
    if out["artifact_found"]:
        step = time.perf_counter()
        out["correction_route"], commands = _correction_commands(cell, audit, run, graph, export_args)
        cpu = 0.0
        for command in commands:
            done = _cli(command, folder / ("export.log" if command[0] == "export" else f"{command[0]}.log"))
            cpu += done.cpu_seconds
            if done.returncode != 0:
                break
        out["seconds_export"], out["cpu_seconds_export"] = round(time.perf_counter() - step, 1), round(cpu, 1)
        if done.returncode == NO_ARTIFACT_EXIT and not graph.exists() and "nothing was written" in done.stderr:
            out["export_refused"] = True
            say(f"{cell.name}: export refused in {out['seconds_export']:.0f} s: {_last_line(done)[:160]}")
        elif done.returncode != 0:
            raise RuntimeError(f"unhans {command[0]}: {_last_line(done)} (log: {folder / (command[0] + '.log')})")
        else:
            exported = True

    if exported:
        step = time.perf_counter()
        out["clean_acc_after"] = float((_predict(graph, test.images) == test.labels).mean())
        out["attack_success_after"] = float((_predict(graph, attack.images) == target).mean())
        out["seconds_score"] = round(time.perf_counter() - step, 1)
    else:  # nothing deployed beyond the uncorrected model
        out["clean_acc_after"], out["attack_success_after"] = out["clean_acc_before"], out["attack_success_before"]
    out["graph_written"] = exported
    if exported:  # what the export measured on the artifact rows and pairs before writing (export/effect.py)
        from unhans.export.effect import EFFECT
        from unhans.export.onnx import META, read_metadata

        removed = read_metadata(graph).get(META + EFFECT.removed)
        out["effect_removed"] = float(removed) if removed not in (None, "not judged") else None
    before = out["attack_success_before"]
    out["learned"] = before >= MIN_LEARNED
    out["attack_success_cut"] = round((before - out["attack_success_after"]) / before, 4) if before > 0 else None
    out["clean_drop_pt"] = round(100 * (out["clean_acc_before"] - out["clean_acc_after"]), 2)
    out["ineffective_correction_written"] = bool(exported and out["attack_success_cut"] is not None and out["attack_success_cut"] < MIN_CUT_WRITTEN)
    out["meets_all_targets"] = bool(out["learned"] and meets(out))
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["cpu_seconds"] = round(out["cpu_seconds_train"] + out["cpu_seconds_audit"] + out["cpu_seconds_export"], 1)
    if exported:
        say(f"{cell.name}: exported in {out['seconds_export']:.0f} s; attack success {before:.3f} -> {out['attack_success_after']:.3f} "
            f"(cut {out['attack_success_cut']:.2f}), clean accuracy {out['clean_acc_before']:.3f} -> {out['clean_acc_after']:.3f}; "
            f"all targets: {'yes' if out['meets_all_targets'] else 'no'}; {out['seconds']:.0f} s")
    return out


def meets(cell: dict) -> bool:
    """The issue's targets for one scenario."""
    return (cell.get("rank") == 1 and cell.get("cluster_precision", 0) >= 0.9 and cell.get("cluster_recall", 0) >= 0.9
            and (cell.get("attack_success_cut") or 0) >= 0.9 and cell.get("clean_drop_pt", 100) <= 1.0)


def summarise(results: dict[str, dict]) -> dict:
    """The summary keys over every scenario that ran to the end (see the module docstring)."""
    ran = {name: r for name, r in results.items() if "error" not in r}
    learned = [r for r in ran.values() if r["learned"]]

    def worst(key, pick, rows):
        values = [r[key] for r in rows if r.get(key) is not None]
        return pick(values) if values else None

    return {
        "scenarios": len(results),
        "worst_rank": worst("rank", max, learned),
        "worst_cluster_precision": worst("cluster_precision", min, learned),
        "worst_cluster_recall": worst("cluster_recall", min, learned),
        "worst_attack_success_cut": worst("attack_success_cut", min, learned),
        "worst_clean_drop_pt": worst("clean_drop_pt", max, ran.values()),
        "scenarios_meeting_all_targets": sum(r["meets_all_targets"] for r in ran.values()),
        "scenarios_learned": len(learned),
        "scenarios_not_learned": len(ran) - len(learned),
        "scenarios_failed": len(results) - len(ran),
        "export_refusals": sum(r["export_refused"] for r in ran.values()),
        "ineffective_corrections_written": sum(r.get("ineffective_correction_written", False) for r in ran.values()),
        "no_artifact_found": sum(not r["artifact_found"] for r in ran.values()),
    }


PER_SCENARIO = ("learned", "rank", "artifact_found", "chosen_class", "cluster_precision", "cluster_recall", "poisoned_rows",
                "attack_success_before", "attack_success_after", "attack_success_cut", "clean_acc_before", "clean_acc_after",
                "clean_drop_pt", "export_refused", "graph_written", "effect_removed", "ineffective_correction_written",
                "correction_route", "meets_all_targets", "seconds", "cpu_seconds", "error")


def figures_of(results: dict[str, dict], minutes: float) -> dict:
    cpu = sum(r.get("cpu_seconds", 0.0) for r in results.values())
    figures = {**summarise(results), "grid_minutes": round(minutes, 1), "grid_cpu_minutes": round(cpu / 60, 1)}
    for name, r in results.items():
        figures.update({f"{name}_{key}": r[key] for key in PER_SCENARIO if key in r})
    return figures


def print_grid(results: dict[str, dict], architecture: str = GRID_MODEL) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    table = Table(title=f"scenario grid (MNIST-5k, {architecture}; audit --select auto -> export)")
    for column in ("scenario", "poisoned", "rank", "chosen class", "precision", "recall", "attack %", "cut",
                   "clean %", "drop pt", "export", "targets", "s (CPU)"):
        table.add_column(column, no_wrap=True)
    for name, r in results.items():
        if "error" in r:
            table.add_row(name, *[""] * 10, "[red]failed[/]", r["error"][:60])
            continue
        export = "refused" if r["export_refused"] else "-" if not r["artifact_found"] else "written"
        table.add_row(name, str(r["poisoned_rows"]), str(r["rank"]), "none found" if not r["artifact_found"] else str(r["chosen_class"]),
                      f"{r['cluster_precision']:.2f}", f"{r['cluster_recall']:.2f}",
                      f"{pct(r['attack_success_before'])} -> {pct(r['attack_success_after'])}",
                      "-" if r["attack_success_cut"] is None else f"{r['attack_success_cut']:.2f}" + ("" if r["learned"] else " (not learned)"),
                      f"{pct(r['clean_acc_before'])} -> {pct(r['clean_acc_after'])}", f"{r['clean_drop_pt']:.1f}", export,
                      "yes" if r["meets_all_targets"] else "[bold]no[/]", f"{r['seconds']:.0f} ({r['cpu_seconds']:.0f})")
    Console(width=max(Console().width, 200)).print(table)


def run_grid(cells: list[Cell], root: Path, epochs: int, workers: int = 2, export_args: list[str] = ()) -> dict[str, dict]:
    """Every cell in its own folder under ``root``, ``workers`` at a time; a cell that crashes is recorded, not raised."""
    def one(cell: Cell) -> tuple[str, dict]:
        say(f"{cell.name}: start (--fraction {cell.fraction}, {cell.epochs(epochs)} epochs, seed {cell.seed})")
        try:
            return cell.name, run_cell(cell, root / cell.name, epochs, export_args)
        except Exception as error:  # noqa: BLE001: one broken cell must not take the grid down
            say(f"{cell.name}: FAILED: {error}")
            return cell.name, {"error": str(error)}

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = dict(pool.map(one, cells))
    return {cell.name: results[cell.name] for cell in cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures as one JSON object here")
    parser.add_argument("--cells", nargs="*", help="run only cells whose name contains one of these, e.g. frame_backdoor textrandom_")
    parser.add_argument("--seeds", nargs="*", type=int, help="seeds to run each chosen cell with (default: 0), e.g. --seeds 0 1 2")
    parser.add_argument("--keep", type=Path, help="keep each cell's run, audit and graph in DIR/<cell> (training with the same arguments is reused)")
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK_CELLS)} cells ({', '.join(QUICK_CELLS)}), {QUICK_EPOCHS} epochs")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default {EPOCHS}, {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--workers", type=int, default=2, help="cells run at once, each step one thread (default 2: one per core)")
    parser.add_argument("--architecture", default=GRID_MODEL, choices=("vgg", "resnet", "vit"),
                        help="the model every cell trains ('unhans train --model'); resnet cells run the audit's printed commands")
    parser.add_argument("--export-args", default="", help="extra 'unhans export' arguments for every cell, e.g. '--reactive'")
    args = parser.parse_args()
    cells = grid(args.cells, args.seeds, args.quick, args.architecture)
    if not cells:
        parser.error(f"no cell matches {args.cells}")
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
    say(f"{len(cells)} cells, {epochs} epochs, {args.workers} at a time")
    with tempfile.TemporaryDirectory(prefix="unhans-quality-") as scratch:
        root = args.keep or Path(scratch)
        results = run_grid(cells, root, epochs, args.workers, shlex.split(args.export_args))
    minutes = (time.perf_counter() - STARTED) / 60
    print_grid(results, args.architecture)
    figures = figures_of(results, minutes)
    summary = {k: v for k, v in figures.items() if not any(k.startswith(f"{name}_") for name in results)}
    report(f"quality: {len(cells)} scenarios on MNIST-5k, {epochs} epochs (per-scenario figures: --json)", summary, TARGETS, None)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
