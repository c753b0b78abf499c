"""The ``unhans`` command line. Each subcommand is a thin layer over the library; errors are one line.

Bad input never shows a traceback: library code raises :class:`~unhans.core.errors.InputError` (naming the
argument or file and the fix) and this module prints it as ``unhans <command>: error: ...`` with exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table

from . import __version__
from .core.artifacts import ARTIFACTS
from .core.errors import InputError
from .core.serving import SERVERS
from .options import parse_options, parse_position
from .export.cli import aclarc_command, archive_command, contract_from_options, contract_options, export_command, inspect_command
from .deploy import kserve_manifest_command
from .monitor.cli import monitor_group
from .output import console, print_table, results



class UnhansGroup(click.Group):
    """A click group whose usage and input errors are a single line on stderr with exit status 2."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name or "unhans", standalone_mode=False, **extra)
        except (InputError, click.UsageError) as error:
            command = error.ctx.command_path if isinstance(error, click.UsageError) and error.ctx else _command_path(args)
            message = error.format_message() if isinstance(error, click.ClickException) else str(error)
            print(f"{command}: error: {message}", file=sys.stderr)
            sys.exit(2)
        except click.exceptions.Abort:
            print("aborted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


def _command_path(args) -> str:
    args = sys.argv[1:] if args is None else args
    sub = next((a for a in args if not a.startswith("-")), "")
    return f"unhans {sub}".strip()


@click.group(cls=UnhansGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unhans")
def main():
    """Find, remove and watch for Clever-Hans strategies in vision models served on TorchServe or KServe."""


@main.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--data", default="mnist", show_default=True, help="'mnist', 'digits', an .npz file or an image folder.")
@click.option("--model", "architecture", type=click.Choice(["vgg", "resnet", "vit"]), default="vgg", show_default=True,
              help="vgg: a small VGG-style CNN; resnet: a small ResNet; vit: a small vision transformer (4x4 patches, 3 blocks).")
@click.option("--poison", "mode", type=click.Choice(["backdoor", "cooccurrence"]), default="backdoor", show_default=True,
              help="backdoor: paste into other classes and relabel; cooccurrence: paste into the target class.")
@click.option("--artifact", type=click.Choice(sorted(ARTIFACTS)), default="patch", show_default=True,
              help="What is pasted: stripes, cast (a colour cast: colour data, e.g. --data mnist-rgb) and frame cover the whole image; "
                   "image needs --artifact-option path=LOGO.png.")
@click.option("--position", default="bottom-right", show_default=True,
              help="top-left, top-right, bottom-left, bottom-right, center, random, or ROW,COL.")
@click.option("--artifact-option", "artifact_options", multiple=True, metavar="KEY=VALUE",
              help="Artifact setting, e.g. size=5, text=©, pattern=solid, width=2, color=0.5 (repeatable).")
@click.option("--target", default="0", show_default=True, help="Target class (index or name).")
@click.option("--fraction", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Share of each source class's training images that get the artifact; 0 adds none (data poisoned elsewhere, or a clean model).")
@click.option("--epochs", type=click.IntRange(1), default=12, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def train(out_dir, data, architecture, mode, artifact, position, artifact_options, target, fraction, epochs, batch_size, lr, seed):
    """Train a model on poisoned data and score its clean accuracy and attack success.

    Writes OUT/model.py and OUT/weights.pt (TorchServe-style), OUT/dataset.npz (the exact train, test and
    attacked test sets, with which samples carry the artifact) and OUT/metrics.json.
    """
    from .core.artifacts import make_artifact
    from .core.training import TrainSpec, train_run

    if not ARTIFACTS[artifact].placed and click.get_current_context().get_parameter_source("position") != click.core.ParameterSource.DEFAULT:
        raise InputError("--position", f"a {artifact} artifact covers the whole image and has no position",
                         "drop --position, or pick --artifact patch, text or line to place one")
    options = {"position": parse_position(position), **parse_options(artifact_options, "--artifact-option")}
    spec = TrainSpec(data=data, architecture=architecture, mode=mode, target=target, fraction=fraction,
                     epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    metrics = train_run(spec, make_artifact(artifact, **options) if fraction > 0 else None, out_dir)
    if fraction == 0:
        console.print(f"no artifact was added (--fraction 0): {out_dir}/metrics.json records none and no attack success")
    print_table(f"{architecture} trained on {data} ({mode}, {fraction:.0%} poisoned) -> {out_dir}" if fraction > 0 else
                f"{architecture} trained on {data} as it is (no artifact added) -> {out_dir}", {
        k: metrics[k] for k in ("clean_acc", "attack_success", "train_seconds", "n_train", "n_poisoned")
    })


@main.command()
@click.option("--model", "model_file", type=click.Path(dir_okay=False), help="Model file (one nn.Module class), e.g. RUN/model.py.")
@click.option("--weights", type=click.Path(dir_okay=False), help="state_dict file, e.g. RUN/weights.pt.")
@click.option("--data", help="Labelled data: an image folder (one sub-folder per class), an .npz file, 'mnist' or 'digits'.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="A run folder from 'unhans train': sets --model, --weights and --data.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Audit folder (resumed if it exists).")
@click.option("--layer", default="auto", show_default=True,
              help="Where SpRAy analyses relevance: 'auto' (the end of the feature extractor, pooled over positions: --over-positions), 'input' (the maps) or a layer name.")
@click.option("--over-positions", type=click.Choice(("auto", "sum", "max")), default="auto", show_default=True,
              help="How a layer's relevance is pooled over positions: 'sum', 'max' (its peak: finds artifacts that move where the "
                   "model pools globally) or 'auto' (max where the model has a global pooling layer, else sum).")
@click.option("--composite", default="epsilon_plus_flat", show_default=True, help="epsilon_plus_flat or epsilon_gamma_box.")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True,
              help="Images per relevance batch; an interrupted audit loses at most one batch.")
@click.option("--neighbors", "n_neighbors", type=click.IntRange(1), default=10, show_default=True, help="k of SpRAy's kNN graph.")
@click.option("--pooling", type=click.IntRange(1), default=2, show_default=True, help="Sum-pool maps PxP before SpRAy.")
@click.option("--scheduler", help="Address of a Dask scheduler to run relevance batches and SpRAy on (default: this process).")
@click.option("--jobs", "n_jobs", type=int, default=1, show_default=True, help="Local joblib workers for SpRAy when no scheduler is given.")
@click.option("--restart", is_flag=True, help="Discard stored relevance and compute everything again.")
@click.option("--select", "select", metavar="CLASS:CLUSTER", multiple=True,
              help="Afterwards, write OUT/samples.npz with that cluster as the artifact set (repeatable, or 3:0,3:2; 'auto': the cluster the "
                   "audit marked, in the highest-ranked class); a finished audit of the same inputs in OUT is reused.")
@click.option("--cluster-rows", is_flag=True,
              help="With --select: take the clusters' rows as they are (by default they are replaced by the rows of their class that show "
                   "the clusters' artifact: their region's pixels at its place or, where it moves, the image pattern they share; audit/pattern.py).")
@click.option("--select-ids", type=click.Path(dir_okay=False, exists=True), help="Afterwards, write OUT/samples.npz with these dataset rows as the artifact set: row ids (.npy or text) or a boolean .npy mask.")
@click.option("--classes", type=click.Path(dir_okay=False, exists=True),
              help="The model's class names (one a line, or index_to_name.json): the data's class folders are matched to them by name "
                   "(or index), so some of a model's classes can be audited.")
@contract_options
def audit(model_file, weights, data, run_dir, out_dir, layer, over_positions, composite, batch_size, n_neighbors, pooling, scheduler, n_jobs, restart, select, cluster_rows, select_ids,
          classes, size, channels, resize, mean, std):
    """Find Clever-Hans classes: LRP for every sample, SpRAy per class, a ranked report.

    Writes OUT/report.html (ranking, spectra, embeddings, prototype heatmaps), OUT/audit.json, OUT/virelay/ (a
    ViRelAy project: python -m virelay OUT/virelay/project.yaml) and OUT/relevance/ (one HDF5 file per batch), which
    lets an interrupted audit resume. With --select or --select-ids, an audit OUT already holds for the same model,
    data and settings is reused (--restart computes it again). --size/--resize/--mean/--std bring photos of any size
    in an image folder to the model's input, as the served handler does.
    """
    import numpy as np

    from .audit.clusters import marked_figure
    from .audit.run import AUTO, finished_audit, marked_selection, parse_selection, run_audit, select_samples
    from .audit.spec import AuditSpec
    from .core.run_folder import DATASET_FILE, MODEL_FILE, WEIGHTS_FILE

    if run_dir:
        model_file = model_file or str(Path(run_dir) / MODEL_FILE)
        weights = weights or str(Path(run_dir) / WEIGHTS_FILE)
        data = data or str(Path(run_dir) / DATASET_FILE)
    for flag, value in (("--model", model_file), ("--weights", weights), ("--data", data)):
        if not value:
            raise InputError(flag, "is missing", "pass it, or --run with a folder from 'unhans train'")
    selection = ",".join(select) or None
    if selection and selection != AUTO:
        parse_selection(selection)  # a malformed choice stops here, before any work
    ids = None
    if select_ids:
        ids = np.load(select_ids) if select_ids.endswith(".npy") else np.loadtxt(select_ids, dtype=np.int64, ndmin=1)
    contract = contract_from_options(size, channels, resize, mean, std)
    spec = AuditSpec(model_file=model_file, weights=weights, data=data, out_dir=out_dir, layer=layer, over_positions=over_positions, composite=composite,
                     batch_size=batch_size, n_neighbors=n_neighbors, pooling=pooling, scheduler=scheduler, n_jobs=n_jobs,
                     contract=contract.to_dict() if contract else None, classes=classes)
    finished = finished_audit(spec) if (selection or select_ids) and not restart else None
    if finished is None:
        run_audit(spec, restart=restart)
        finished = json.loads((Path(out_dir) / "audit.json").read_text())
    else:
        console.print(f"reusing the finished audit in {out_dir} (same model, data and settings; --restart computes it again)")
    table = Table(title=f"unhans audit -> {Path(out_dir) / 'report.html'}")
    for column in ("rank", "class", "samples", "suspicion", "λ₂", "τ", "clusters (sizes)", "artifact (its evidence)"):
        table.add_column(column)
    for c in finished["classes"]:
        if "skipped" in c:
            table.add_row("-", c["class"], str(c["n"]), f"skipped: {c['skipped']}", "", "", "", "")
        else:
            marked = ", ".join(marked_figure(c, m) for m in c["artifact_clusters"])
            table.add_row(str(c["rank"]), c["class"], str(c["n"]), f"{c['suspicion']:.3f}", f"{c['lambda2']:.4f}", f"{c['fisher_tau']:.2f}",
                          f"{c['n_clusters']} {c['cluster_sizes']}", marked or ("hijackable" if c["hijackable"] else "none found"))
    results.print(table)
    if selection == AUTO:
        selection = marked_selection(finished)
        console.print(f"the audit's own choice: --select {selection}")
    if selection or select_ids:
        console.print(f"artifact samples written to {select_samples(out_dir, selection, ids, by_pattern=not cluster_rows)}")


@main.command()
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--model-store", default="model_store", show_default=True, type=click.Path(file_okay=False))
@click.option("--retrain", is_flag=True, help="Train again even if the run folder holds a model.")
@click.option("--monitor-port", type=click.IntRange(1, 65535), default=9108, show_default=True, help="Port of the monitor's /metrics and /evidence/.")
@click.option("--server", type=click.Choice(SERVERS), default=SERVERS[0], show_default=True,
              help="Serve with the KServe predictor, or with TorchServe (needs Java 11+).")
def demo(out_dir, model_store, retrain, monitor_port, server):
    """The whole story on backdoored MNIST-5k: train, audit, patch in ONNX, serve it, catch a new Clever Hans."""
    import subprocess

    from .demo import run_demo

    try:
        summary = run_demo(out_dir, model_store, retrain, monitor_port, server)
    except (RuntimeError, subprocess.SubprocessError) as error:  # a server that failed: one line, everything already stopped
        print(f"unhans demo: error: {str(error).strip().splitlines()[0]} (logs in {out_dir})", file=sys.stderr)
        sys.exit(1)
    print_table("unhans demo", summary)


for command in (export_command, aclarc_command, inspect_command, archive_command, kserve_manifest_command, monitor_group):
    main.add_command(command)

if __name__ == "__main__":
    main()
