"""Run every benchmark of the project, one after the other, and write BENCHMARKS.md: every figure, its target, the
machine and the date, so the README links to measured numbers rather than claims.

    python bench/run.py [--only NAME ...] [--out BENCHMARKS.md]

Benchmarks run one at a time (timings are ratios measured side by side inside one benchmark, and two at once
would disturb each other). training.py runs first and keeps its two models in .bench/runs, which the others reuse
instead of training their own. Each benchmark's JSON is kept in .bench/<name>.json; with --only, the others' last
results are reused, so the page always lists every figure.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STORE = ROOT / ".bench"
RUNS = STORE / "runs"
# name: extra arguments (science_spray.py is part of science.py; common.py and stock_mnist_handler.py are helpers)
BENCHMARKS = {
    "training": ["--out", str(RUNS)],
    "science": ["--run", str(RUNS / "vgg")],
    "audit": ["--run", str(RUNS / "vgg")],
    "export": ["--vgg-run", str(RUNS / "vgg"), "--resnet-run", str(RUNS / "resnet")],
    "explain": ["--vgg-run", str(RUNS / "vgg"), "--resnet-run", str(RUNS / "resnet")],
    "models": [],
    "imagenet": [],
    "serving": ["--run", str(RUNS / "vgg")],
    "monitor": ["--run", str(RUNS / "vgg")],
    "monitor_real": [],  # reads ../shared/imagenet-sample; explains ~5,000 224-px images (about 30 min on 2 cores)
    "kserve": ["--run", str(RUNS / "vgg")],
    "reliability": ["--run", str(RUNS / "vgg")],
    "quality": [],  # issue 18's scenario grid: trains its own 24 models (30-45 min on 2 cores)
}
COMPARISON = re.compile(r"^\s*(<=|>=|<|>|==)?\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")


def targets_of(name: str) -> dict:
    """The TARGETS table a benchmark declares (imported without running it)."""
    sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is being executed
    spec.loader.exec_module(module)
    return dict(getattr(module, "TARGETS", {}))


def met(value, target: str) -> str:
    """'yes' / 'no' where the target is a plain comparison with a number, else '' (a target that needs reading)."""
    match = COMPARISON.match(target or "")
    if not match or not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    op, bound = match.group(1) or "==", float(match.group(2))
    ok = {"<=": value <= bound, ">=": value >= bound, "<": value < bound, ">": value > bound, "==": value == bound}[op]
    return "yes" if ok else "**no**"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def commit() -> str:
    """HEAD, marked dirty when the working tree has changes: what the figures were measured on."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return f"{head or 'unknown'}{'+changes' if dirty else ''}"


def write_page(path: Path, results: dict, runs: dict) -> None:
    lines = ["# Benchmarks", "", f"Written by `python bench/run.py` on {datetime.date.today().isoformat()}, on {machine()}. Every figure "
             "comes from the benchmark's own JSON (`--json`); timings are ratios measured side by side in one run, absolute seconds",
             "move with the machine's load. 'met' is filled where the target is a plain comparison.", ""]
    for name, figures in results.items():
        targets = targets_of(name)
        run = runs.get(name, {})
        took = f" ({run['seconds']:.0f} s, {run['date']}, commit `{run['commit']}`)" if run else ""
        lines += [f"## {name}{took}", "", f"`.venv/bin/python bench/{name}.py`", "", "| figure | value | target | met |", "| --- | --- | --- | --- |"]
        for key, value in figures.items():
            # a per-model figure (resnet50_explain_over_predict_b16) takes the target of the key it ends with
            target = targets.get(key) or next((t for k, t in targets.items() if key.endswith(f"_{k}")), "")
            lines.append(f"| {key} | {shown(value)} | {target} | {met(value, target)} |")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS), help="run only these (the rest: last results)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--page-only", action="store_true", help="run nothing: write the page from the stored results")
    args = parser.parse_args()
    STORE.mkdir(exist_ok=True)
    chosen = [] if args.page_only else args.only or list(BENCHMARKS)
    needs_runs = any(str(RUNS) in " ".join(BENCHMARKS[name]) for name in chosen if name != "training")
    if needs_runs and not (RUNS / "vgg" / "weights.pt").is_file() and "training" not in chosen:
        chosen = ["training", *chosen]  # the others reuse its models
    failed = []
    for name in BENCHMARKS:
        if name not in chosen:
            continue
        print(f"== bench/{name}.py", flush=True)
        started, measured_on = time.perf_counter(), commit()
        done = subprocess.run([sys.executable, f"{name}.py", "--json", str(STORE / f"{name}.json"), *BENCHMARKS[name]], cwd=HERE)
        (STORE / f"{name}.run.json").write_text(json.dumps({"seconds": time.perf_counter() - started, "commit": measured_on,
                                                            "date": datetime.date.today().isoformat()}))
        if done.returncode != 0:
            failed.append(name)
    results = {name: json.loads((STORE / f"{name}.json").read_text()) for name in BENCHMARKS if (STORE / f"{name}.json").is_file()}
    runs = {name: json.loads((STORE / f"{name}.run.json").read_text()) for name in results if (STORE / f"{name}.run.json").is_file()}
    write_page(args.out, results, runs)
    print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
