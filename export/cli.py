"""``unhans export``, ``unhans aclarc``, ``unhans inspect`` and ``unhans archive``: thin click layers over :mod:`unhans.export`.

Defined as plain commands; the main group registers them (``main.add_command(export_command)`` ...), and its
error handling turns every :class:`InputError` into one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from ..audit.samples import SAMPLES, data_fingerprint
from ..core.defaults import ACLARC_EPOCHS, ACLARC_FRACTION, ACLARC_LR, CAV_METHODS, ENERGY_SHARE, MAX_DIRECTIONS
from ..core.cost import MAX_CLASS_COST_PT, MAX_COST_PT, MIN_CLASS_SAMPLES, HeldOut
from ..core.errors import InputError
from ..core.serving import SampleConfig, ServingConfig
from ..output import print_table, results, warn
from .effect import EFFECT, MIN_REMOVED, PAIR_IMAGES, ArtifactProbe

COST_FLAGS = ("--max-cost", "--max-class-cost")  # the flags a refused cost names (core.cost.Cost.check)
PROBE_ROWS = 32  # per kind (artifact, clean): enough to exercise a reactive gate both ways, quick to run twice
EXPLAIN_PROBE_ROWS = 4  # per kind, for --explain: zennit keeps every activation (Lite0 at 224 px: ~100 MB an image)
AUTO = "auto"  # --layer auto: chosen on held-out pairs (export/layer_choice.py)
COST_CLASSES_SHOWN = 10  # classes listed in the cost table, the most costly first

# The CLI corrects the flattened activation. The per-position (channel) projection of core.cav removed no artifact
# measured (MNIST backdoors, a "©" at random positions with its cluster found: 66% attack success left against flat's
# 39%; EfficientNet-Lite0's watermark), so it stays in the Python API for experiments and is not offered here.
CLI_MODE = "flat"


def contract_options(command):
    """The input contract's options (:class:`unhans.core.contract.InputContract`), shared by audit, export and archive."""
    for option in reversed([
        click.option("--size", help="Model input H,W (or one number for a square), e.g. 224; default: the graph's, run's or images' own."),
        click.option("--channels", type=click.IntRange(1), default=3, show_default=True, help="Input channels (with --size)."),
        click.option("--resize", type=click.IntRange(0), default=0, show_default=True,
                     help="Scale an image's shorter side to this, then centre-crop to --size (ImageNet: 256); 0 scales straight to --size."),
        click.option("--mean", help="Per-channel mean subtracted after scaling pixels to [0, 1], e.g. 0.485,0.456,0.406."),
        click.option("--std", help="Per-channel std divided by, e.g. 0.229,0.224,0.225."),
    ]):
        command = option(command)
    return command


def contract_from_options(size, channels, resize, mean, std):
    """The contract the options declare, or None when --size is not given (the graph's or run's shape is used)."""
    from ..core.contract import InputContract

    def numbers(text, flag):
        try:
            return [float(v) for v in text.split(",")]
        except ValueError:
            raise InputError(flag, f"{text!r} is not a comma-separated list of numbers", f"write e.g. {flag} 0.5,0.5,0.5") from None
    if size is None:
        if mean or std or resize:
            raise InputError("--size", "is needed with --mean, --std or --resize", "pass the model's input size, e.g. --size 224")
        return None
    sides = numbers(size, "--size")
    if len(sides) not in (1, 2) or any(s < 1 or s != int(s) for s in sides):
        raise InputError("--size", f"{size!r} is not H,W", "write e.g. --size 224 or --size 224,224")
    height, width = int(sides[0]), int(sides[-1])
    return InputContract(channels, height, width, numbers(mean, "--mean") if mean else [0.0], numbers(std, "--std") if std else [1.0], resize)


def _images(path: str, argument: str, shape: tuple) -> np.ndarray:
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(argument, f"cannot read {path} ({error})", "pass a .npy array of images (N, C, H, W)") from None
    if images.ndim != 4 or (shape and tuple(images.shape[1:]) != tuple(shape)) or len(images) < 2:
        raise InputError(argument, f"{path} holds shape {images.shape}", f"pass at least 2 images shaped (N, {', '.join(map(str, shape)) or 'C, H, W'})")
    return np.ascontiguousarray(images, np.float32)


def _index(z, key: str, n: int, path: str) -> np.ndarray:
    if key not in z:
        raise InputError("--samples", f"{path} has no array {key!r}",
                         f"write arrays {SAMPLES.artifact!r} and {SAMPLES.clean!r} (boolean masks or indices)")
    index = np.asarray(z[key])
    if index.dtype == bool:
        if index.shape != (n,):
            raise InputError("--samples", f"mask {key!r} has shape {index.shape}, the run's training set {n} samples", "write one entry per training sample")
        return np.flatnonzero(index)
    if not np.issubdtype(index.dtype, np.integer) or index.ndim != 1 or (index.size and (index.min() < -n or index.max() >= n)):
        raise InputError("--samples", f"{key!r} is not a list of indices into {n} training samples", "write boolean masks or integer indices")
    return index


def _check_audited_data(z, path: str, train, known: str | None = None) -> None:
    """Refuse a samples file selected from an audit of other data: its row numbers would pick other images, and a CAV
    fitted on them corrects the wrong thing (sizes can agree: another run of the same recipe, another seed).
    ``known``: ``train``'s fingerprint where it was just checked (a folder audit's images), so they are not hashed twice."""
    if SAMPLES.data in z and str(z[SAMPLES.data]) != (known or data_fingerprint(train.images, train.labels)):
        raise InputError("--samples", f"{path} was selected from an audit of other data than this run's training set",
                         "audit this run and select again: unhans audit --run RUN --out AUDIT --select auto")


def _scenario(run_dir):
    """A run's (poisoned train set, clean test set, attacked test set), or (None, None, None) without --run."""
    if run_dir is None:
        return None, None, None
    from ..core.poison import load_scenario
    from ..core.run_folder import DATASET_FILE

    if not (Path(run_dir) / DATASET_FILE).is_file():
        raise InputError("--run", f"{Path(run_dir) / DATASET_FILE} is missing", "pass a run folder written by 'unhans train'")
    return load_scenario(Path(run_dir) / DATASET_FILE)[:3]


def _samples(train, samples, artifact_samples, clean_samples, known_data: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(artifact images, clean images, the rows of the clean images of the artifact rows' own classes) for fitting the
    CAV, from the options in order of precedence; the third is None where the samples are not rows of a labelled set,
    or their classes hold fewer than ``PROBE_ROWS`` clean rows (:func:`_within_cost`). ``known_data``: ``train``'s
    fingerprint where already checked (:func:`_check_audited_data`)."""
    shape = train.image_shape if train is not None else ()
    if artifact_samples:
        artifact = _images(artifact_samples, "--artifact-samples", shape)
        if clean_samples:
            return artifact, _images(clean_samples, "--clean-samples", artifact.shape[1:]), None
        if train is None:
            raise InputError("--clean-samples", "is needed without --run", "pass images without the artifact, or --run")
        return artifact, train.images[~train.has_artifact], None
    if train is None:
        raise InputError("--run", "no samples to fit the CAV on", "pass --run, or --artifact-samples and --clean-samples")
    if samples:
        with np.load(samples, allow_pickle=False) as z:
            _check_audited_data(z, samples, train, known_data)
            artifact, clean = (_index(z, key, len(train), samples) for key in (SAMPLES.artifact, SAMPLES.clean))
    elif not train.has_artifact.any():
        raise InputError("--run", "its training set marks no sample as carrying the artifact", "pass --samples or --artifact-samples")
    else:
        artifact, clean = train.has_artifact, ~train.has_artifact
    own = np.zeros(len(train), bool)
    own[clean] = True
    own &= np.isin(train.labels, np.unique(train.labels[artifact]))
    return train.images[artifact], train.images[clean], np.flatnonzero(own) if own.sum() >= PROBE_ROWS else None


def _held_out(run_dir, test, clean, clean_source: str, max_cost, max_class_cost, labels=None, names=None):
    """What the correction's cost is measured on: a run's labelled clean test set (judged against the model before
    A-ClArC where the run was fine-tuned by it), else the clean images the CAV saw (``clean_source`` says which),
    judged on accuracy where ``labels`` are known (labelled photos), else by agreement with the uncorrected model."""
    if test is not None:
        baseline, against = _before_aclarc(run_dir, test)
        return HeldOut(test.images, test.labels, "the run's clean test set" + against, list(test.classes), max_cost, max_class_cost, baseline)
    return HeldOut(clean, labels, clean_source, names, max_cost, max_class_cost)


def _before_aclarc(run_dir, test) -> tuple[np.ndarray | None, str]:
    """The outputs on the test set of the model a run was fine-tuned from by ``unhans aclarc`` (its metrics.json names
    the source run), and words saying so; (None, "") for a run that was not.

    A-ClArC's own cost check judges the fine-tuning; the export's judges the projection after it. Judged each against
    the model before it, two steps within 1 point each could ship a model 2 points worse than the one served. One
    step back only: a run fine-tuned twice is judged against the run it was fine-tuned from the second time.
    """
    from ..core.run_folder import METRICS_FILE, MODEL_FILE, WEIGHTS_FILE

    metrics = Path(run_dir) / METRICS_FILE
    source = json.loads(metrics.read_text()).get("aclarc", {}).get("source_run") if metrics.is_file() else None
    if source is None:
        return None, ""
    if not all((Path(source) / name).is_file() for name in (MODEL_FILE, WEIGHTS_FILE)):
        warn(f"{run_dir} was fine-tuned by A-ClArC from {source}, which is gone: the correction's cost is judged against the "
             "fine-tuned model only, not against the model before both")
        return None, ""
    from ..core.models import load_model
    from ..core.training import probabilities

    before = load_model(Path(source) / MODEL_FILE, Path(source) / WEIGHTS_FILE)
    return probabilities(before, test.images), f", against {source}'s model before A-ClArC"


def _paster(artifact_image, position, artifact_options, contract):
    """The paired route's artifact image as a function that pastes it into model inputs (through the input contract's
    pixels), and the photos' contract it needs."""
    from ..core.artifacts import Watermark

    if artifact_image is None:
        raise InputError("--images", "needs --artifact-image, the artifact to paste into them", "pass a PNG with alpha, e.g. --artifact-image logo.png")
    if contract is None:
        raise InputError("--images", "needs the model's input contract to read photos", "pass --size (and --resize, --mean, --std)")
    from ..options import parse_options, parse_position

    options = parse_options(artifact_options, "--artifact-option")
    unknown = set(options) - {"size", "opacity", "margin"}
    if unknown:
        raise InputError("--artifact-option", f"{sorted(unknown)} are not options of an image artifact", "use size, opacity, margin")
    watermark = Watermark(path=str(artifact_image), position=parse_position(position), **options)
    return lambda inputs: contract.normalise(watermark.apply(np.clip(contract.denormalise(inputs), 0, 1))[0])


def _pasted(images, paste, contract, names: list[str] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Your photos with and without the artifact image pasted (``paste``, :func:`_paster`), normalised: the paired
    contrast set; and their labels where the photos say them (:func:`_photo_files`), else None."""
    from ..core.layers import batch_rows

    files, labels = _photo_files(images, names)
    if len(files) < 4:
        raise InputError("--images", f"holds {len(files)} photos", "give at least 4 (a few dozen make a reliable CAV)")
    clean = np.empty((len(files), *contract.shape), np.float32)
    pasted = np.empty_like(clean)
    rows = batch_rows(clean)  # read and pasted a batch at a time: the whole folder's temporaries took 4x the photos' size
    for start in range(0, len(files), rows):
        clean[start:start + rows] = contract.normalise(contract.load(files[start:start + rows]))
        pasted[start:start + rows] = paste(clean[start:start + rows])
    return pasted, clean, labels


def _photo_files(folder: str, names: list[str] | None) -> tuple[list[Path], np.ndarray | None]:
    """The photos of ``--images`` and their classes, where they are known: a sub-folder per class (named as a class of
    ``names`` or by its index), or, with ``--classes``, files named by their class index as in ImageNet-style folders
    (``478_n02971356_carton.JPEG``). A flat folder without ``--classes`` is unlabelled."""
    import re

    from ..core.contract import IMAGE_SUFFIXES, image_files

    root = Path(folder)
    if not root.is_dir():
        raise InputError("--images", f"{folder} is not a folder", "pass a folder of PNG/JPEG photos")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir()))
    if classes:
        lookup = {name: i for i, name in enumerate(names or [])}
        files, labels = [], []
        for directory in classes:
            index = lookup.get(directory.name, int(directory.name) if directory.name.isdigit() else None)
            if index is None or (names and index >= len(names)):
                raise InputError("--images", f"sub-folder {directory.name!r} names no class of the model" + ("" if names else " (no --classes given)"),
                                 "name each sub-folder after a class of --classes, or by its index")
            found = image_files(directory)
            files += found
            labels += [index] * len(found)
        return files, np.asarray(labels, np.int64)
    files = image_files(root)
    if names is None:
        return files, None
    indices = [re.match(r"(\d+)(?:[_.\-\s]|$)", f.stem) for f in files]
    unnamed = [f.name for f, m in zip(files, indices) if m is None or int(m.group(1)) >= len(names)]
    if unnamed:
        raise InputError("--classes", f"labels photos by the class index their names begin with, and {len(unnamed)} of {len(files)} "
                         f"in {folder} begin with none (e.g. {unnamed[0]!r})",
                         "name the files NNN_anything.jpg, put them in one sub-folder per class, or drop --classes for unlabelled photos")
    return files, np.asarray([int(m.group(1)) for m in indices], np.int64)


def _artifact_probe(train, test, attack, samples, fitted_rows, paste, other_route, min_removed, better) -> ArtifactProbe:
    """The images the correction's effect on the artifact is judged on (export/effect.py): the artifact rows (those
    fitted on, ``fitted_rows``, or in the paired route the audit's ``--samples`` rows), and held-out pairs: up to
    ``PAIR_IMAGES`` clean images of other classes (the run's test set, else the clean rows) with the artifact pasted in,
    the paired route's image (``paste``) or each artifact row's own region, as the audit's transplant test pasted it;
    without either, a run's own record of its artifact: its attacked test set against the same clean images."""
    from ..core.artifacts import Transplant

    if paste is None and not samples and attack is not None and len(attack):
        unpasted = test.images[test.labels != attack.target]
        chosen = np.unique(np.linspace(0, len(unpasted) - 1, min(PAIR_IMAGES, len(unpasted))).round().astype(int))
        return ArtifactProbe(fitted_rows, "the run's artifact rows, fitted on", attack.images[chosen], unpasted[chosen],
                             "the run's clean test images of other classes, with the artifact it was trained with", other_route,
                             list(test.classes), min_removed, better)
    rows = regions = None
    if samples and train is not None:
        rows, regions = _artifact_regions(samples, train, required=False)
    row_images, rows_source = (train.images[rows], "the audit's selected rows") if rows is not None else (fitted_rows, "the rows fitted on")
    if paste is None and rows is not None:
        rows_source += ", fitted on"
    pool = test if test is not None else train
    pasted = unpasted = None
    pairs_source = ""
    if pool is not None and (paste is not None or regions is not None):
        others = np.ones(len(pool), bool) if rows is None else pool.labels != np.bincount(train.labels[rows]).argmax()
        if test is None and train is not None and rows is not None:
            others[rows] = False
        candidates = np.flatnonzero(others)
        unpasted = pool.images[candidates[np.unique(np.linspace(0, len(candidates) - 1, min(PAIR_IMAGES, len(candidates))).round().astype(int))]]
        where = "the run's clean test images" if test is not None else "clean rows"
        if paste is not None:
            pasted, pairs_source = paste(unpasted), f"{where} of other classes, the artifact image pasted in"
        else:
            pasted = Transplant(train.images[rows], regions).apply(unpasted)[0]
            pairs_source = f"{where} of other classes, each with an artifact row's own region pasted in"
    return ArtifactProbe(row_images, rows_source, pasted, unpasted, pairs_source, other_route,
                         list(pool.classes) if pool is not None else None, min_removed, better)


def _rows_route(model, layer: str, rows: np.ndarray, clean: np.ndarray, held_out: HeldOut):
    """What the rows' own correction does: the logits of the plain projection fitted on the artifact ``rows`` against
    the ``clean`` images at the same layer (fitted when first asked), the reference a correction's effect on the rows
    is judged against (export/effect.py): in the paired route the samples route, in the samples route the plain
    projection a reactive or own-class one replaced. None where that projection costs a class more than ``held_out``'s
    bound per class: one that removes the class with the artifact (a co-occurrence: 15 points of the 0s) turns the rows
    away for the wrong reason, and is no reference. Its overall cost is not held against it: the plain projection that
    stripes on every 3rd row (backdoor to 0 at 10%) ask for costs 2.0 points, and the reactive one replaced it."""
    import torch

    from ..core.clarc import fit_cav, pclarc

    def run(network, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([network(torch.from_numpy(images[i:i + 500])).numpy() for i in range(0, len(images), 500)])

    fitted = []

    def logits(images: np.ndarray) -> np.ndarray | None:
        if not fitted:
            corrected = pclarc(model, layer, fit_cav(model, layer, rows, clean, mode=CLI_MODE)).eval()
            worst = held_out.cost(run(model.eval(), held_out.images), run(corrected, held_out.images)).worst_class
            fair = worst is None or worst.pt <= held_out.max_class_pt
            fitted.append(corrected if fair else None)
        return None if fitted[0] is None else run(fitted[0], images)
    return logits


def _better_route(paired: bool, samples, source: str, layer: str, run_dir, out) -> str:
    """The route a refused correction names: the audit's rows where a paired set was pasted from a region (a piece of
    the artifact, or not the artifact), fine-tuning where the rows' own projection leaves the artifact in place."""
    if paired:
        rows = samples or "AUDIT/samples.npz"
        return (f"the pasted image is not the whole artifact the rows carry; fit the correction from the audit's rows instead: "
                f"unhans export {source} --layer {layer} --samples {rows} --out {out}")
    if run_dir is not None and samples:
        return (f"a projection at {layer} does not remove this artifact; fine-tune the model instead (A-ClArC): unhans aclarc --run {run_dir} "
                f"--samples {samples} --out {run_dir}-aclarc, then export that run with --reactive; or correct a layer after global pooling")
    return f"a projection at {layer} does not remove this artifact; try a layer after global pooling, or fine-tune a training run (unhans aclarc)"


@click.command("export")
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="Run folder written by 'unhans train' (model and samples).")
@click.option("--layer", help="Module path whose output is corrected, e.g. features.pool2 (with --onnx: a module scope in the graph); "
                             f"'{AUTO}' (the default with --images): the block that removes most of the artifact's effect on "
                             "held-out pairs of the photos within the cost bound.")
@click.option("--onnx", "onnx_file", type=click.Path(dir_okay=False), help="Correct this existing ONNX graph instead of exporting the run's model.")
@click.option("--tensor", help="With --onnx: the tensor to correct, by name (instead of --layer).")
@click.option("--method", type=click.Choice(CAV_METHODS), default="pattern", show_default=True, help="How the CAV direction is fitted.")
@click.option("--directions", "n_directions", default="1", show_default=True, metavar="K|auto",
              help="Directions the correction removes (a rank-K projection; needs paired samples, --images, for K > 1): "
                   f"the CAV, then the paired differences' top singular vectors. auto: the fewest holding {ENERGY_SHARE:.0%} of the "
                   f"differences' energy, at most {MAX_DIRECTIONS} and half the pairs.")
@click.option("--reactive/--plain", "reactive", default=None,
              help="Correct only samples whose detector score exceeds --threshold (never folded), or every sample. Default: plain, "
                   "and reactive where the plain projection costs more than --max-cost/--max-class-cost on a run's labelled test set.")
@click.option("--threshold", type=float, default=0.0, show_default=True, help="Detector score above which a sample counts as carrying the artifact (and, with --reactive, is corrected).")
@click.option("--no-fold", "no_fold", is_flag=True, help="Insert the correction as ops even where it could be folded into a linear layer.")
@click.option("--samples", type=click.Path(dir_okay=False),
              help=".npz with 'artifact' and 'clean' masks or indices into the run's training set, or, without --run, the "
                   "samples.npz of a folder audit (its rows are the audited images, read again as the audit did). With --images: the "
                   "rows the correction is judged on, against the correction fitted on them (export/effect.py).")
@click.option("--artifact-samples", type=click.Path(dir_okay=False), help=".npy images (N, C, H, W) that carry the artifact.")
@click.option("--clean-samples", type=click.Path(dir_okay=False), help=".npy images without it (default: the run's training images without it).")
@click.option("--model", "model_file", type=click.Path(dir_okay=False), help="Your model file (one nn.Module class, TorchServe-style), instead of --run.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Its state_dict (with --model).")
@click.option("--images", type=click.Path(file_okay=False), help="A folder of your photos: the correction is fitted on them with and without --artifact-image pasted (a paired set).")
@click.option("--artifact-image", type=click.Path(dir_okay=False), help="The artifact as an image with alpha (a watermark or logo PNG), pasted into --images.")
@click.option("--classes", type=click.Path(dir_okay=False, exists=True),
              help="The model's class names (one a line, or index_to_name.json): --images photos in a sub-folder per class, or named by "
                   "their class index (NNN_*.jpg), are then labelled, and the cost is judged on accuracy instead of agreement.")
@click.option("--position", default="bottom-right", show_default=True, help="Where the artifact image goes: a corner, center, random, or ROW,COL.")
@click.option("--artifact-option", "artifact_options", multiple=True, metavar="KEY=VALUE", help="size=N (longer side in pixels), opacity=0.6, margin=N (repeatable).")
@contract_options
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write; the correction spec goes beside it.")
@click.option("--max-cost", type=click.FloatRange(0), default=MAX_COST_PT, show_default=True,
              help="Points of clean accuracy (without labels: of top-1 agreement with the uncorrected model) the correction may cost; above it nothing is written.")
@click.option("--max-class-cost", type=click.FloatRange(0), default=MAX_CLASS_COST_PT, show_default=True,
              help=f"The same for any one class with at least {MIN_CLASS_SAMPLES} held-out images.")
@click.option("--min-removed", type=click.FloatRange(0, 1), default=MIN_REMOVED, show_default=True,
              help="Share of the artifact's effect the correction must remove, measured on the artifact rows and held-out pairs "
                   "(export/effect.py); less and nothing is written.")
@click.option("--explain", is_flag=True, help="Also write OUT's .explain.onnx: logits and LRP relevance of the corrected model.")
@click.option("--composite", type=click.Choice(("epsilon_plus_flat", "epsilon_gamma_box")), default="epsilon_plus_flat", show_default=True,
              help="The LRP composite of the --explain graph (epsilon_gamma_box bounds the input to [0, 1]).")
def export_command(run_dir, layer, onnx_file, tensor, method, n_directions, reactive, threshold, no_fold, samples, artifact_samples, clean_samples,
                   model_file, weights, images, artifact_image, classes, position, artifact_options, size, channels, resize, mean, std, out,
                   max_cost, max_class_cost, min_removed, explain, composite):
    """Bake a P-ClArC correction into an ONNX graph, verified against PyTorch before it is written.

    Fits the CAV on artifact vs clean samples at the layer, folds the correction into the next linear layer where
    that is exact (else inserts a few rank-1 ops), and writes OUT plus OUT's .correction.npz. The model is a run's
    (--run), your own (--model/--weights), or an existing graph (--onnx, activations from onnxruntime). With --images
    and --artifact-image the samples are your photos with and without the artifact pasted: the paired set.

    What the correction costs is measured on the run's clean test set (clean accuracy, per class too; for a run
    'unhans aclarc' wrote, against the model before it) or, without a run, on the clean images (top-1 agreement with
    the uncorrected graph); over --max-cost or --max-class-cost nothing is written.
    """
    from .correction import Correction
    from .onnx import export_onnx, export_torch, fit_cav_onnx, load_onnx

    if run_dir is not None:
        from ..core.run_folder import MODEL_FILE, WEIGHTS_FILE

        model_file, weights = Path(run_dir) / MODEL_FILE, Path(run_dir) / WEIGHTS_FILE
    if layer is None and tensor is None and images is not None:  # your photos give held-out pairs to choose the block on
        layer = AUTO
    if onnx_file is None and (model_file is None or weights is None or layer is None or tensor is not None):
        raise InputError("--run/--model/--layer", "exporting a PyTorch model needs --run (or --model and --weights) and --layer; "
                         "--tensor only with --onnx", "pass --run RUN --layer features.pool2, or --onnx FILE --tensor NAME")
    if layer == AUTO and images is None:
        raise InputError("--layer", f"{AUTO} chooses among the model's blocks on held-out pairs of your photos, and needs --images",
                         "pass --images and --artifact-image, or name the layer")
    if classes is not None and images is None:
        raise InputError("--classes", "labels the --images photos", "pass --images, or drop --classes")
    if explain and onnx_file is not None:
        raise InputError("--explain", "needs the PyTorch model", "pass --model/--weights (or --run) and --layer instead of --onnx")
    contract = contract_from_options(size, channels, resize, mean, std)
    if n_directions != "auto":
        if not n_directions.isdigit() or int(n_directions) < 1:
            raise InputError("--directions", f"{n_directions!r} is not a number of directions", "pass an integer >= 1 or auto")
        n_directions = int(n_directions)
    paired = images is not None
    train, test, attack = _scenario(run_dir)
    clean_source = "your photos without the artifact (the CAV's own)" if paired else "the clean samples (the CAV's own)"
    known_data = None
    if samples and train is None and not artifact_samples:  # a folder audit's selection: its rows are the audited images
        from ..audit.spec import audited_dataset

        _, train = audited_dataset(Path(samples).parent)  # refused unless the images still hash to audit.json's inputs.data
        known_data = json.loads((Path(samples).parent / "audit.json").read_text())["inputs"]["data"]
        clean_source = "the audited images without the artifact (the CAV's own)"
    own_rows = paste = labels = names = None
    if paired:
        from ..core.data import read_class_names

        names = read_class_names(classes) if classes is not None else None
        paste = _paster(artifact_image, position, artifact_options, contract)
        artifact, clean, labels = _pasted(images, paste, contract, names)
        if labels is not None:
            clean_source = "your labelled photos without the artifact (the CAV's own)"
            names = names or [str(i) for i in range(int(labels.max()) + 1)]
    else:
        artifact, clean, own_rows = _samples(train, samples, artifact_samples, clean_samples, known_data)
    held_out = _held_out(run_dir, test, clean, clean_source, max_cost, max_class_cost, labels, names)
    from ..core.layers import batch_rows

    rows = min(PROBE_ROWS, max(2, batch_rows(artifact) // 2))  # verified in one batch: 224-px photos go fewer
    probe = np.concatenate([artifact[:rows], clean[:rows]])
    fold = not no_fold
    chosen = {}

    def choose(layers) -> str:
        """--layer auto: the block chosen on held-out pairs (export/layer_choice.py), its table printed and kept for the graph."""
        from .layer_choice import choose_layer

        choice = choose_layer(layers, artifact, clean, labels, names, max_cost, max_class_cost, method, CLI_MODE, n_directions,
                              bool(reactive), threshold)
        print_table(f"--layer auto: each block fitted on {choice.fitted} of your photos, judged on the other {choice.judged}",
                    {t.layer: " | ".join(f"{k} {v}" for k, v in t.row().items() if k != "layer") for t in choice.trials})
        results.print(f"chose {choice.layer}: it removes the most of the artifact's effect on held-out pairs"
                      + (" within the cost bound" if choice.within_bound else "; no block stays within the cost bound"), highlight=False)
        chosen.update(choice.metadata())
        return choice.layer

    if onnx_file is not None:
        graph = load_onnx(onnx_file)
        if layer == AUTO:
            from .layer_choice import OnnxLayers

            layer = choose(OnnxLayers(graph))

        judged = _artifact_probe(train, test, attack, samples, artifact if not paired else None, paste, None, min_removed,
                                 _better_route(paired, samples, f"--onnx {onnx_file} --tensor {tensor}" if tensor else f"--onnx {onnx_file} --layer {layer}",
                                               layer or tensor, run_dir, out))

        def fitted(contrast: np.ndarray):
            cav = fit_cav_onnx(graph, artifact, contrast, tensor, layer, method, CLI_MODE, paired, n_directions)
            return cav, lambda gate: export_onnx(onnx_file, Correction.from_cav(cav, gate, threshold), probe, out, tensor, layer, fold,
                                                 cav.quality_, held_out, judged, chosen)
    else:
        from ..core.clarc import fit_cav
        from ..core.models import load_model

        import torch

        from ..core.attribution import LRP

        model = load_model(model_file, weights)
        with LRP(model, composite) as lrp:  # the relevance the archive will serve must be LRP: refused before any work
            # one row of a large input: the float64 check took 1 GB for 4 rows of EfficientNet-Lite0 at 224 px
            conservation = lrp.check(torch.from_numpy(probe[:batch_rows(probe, most=4, budget=1 << 20)]))
        click.echo(f"LRP canonization: {lrp.canonization.summary()}; {conservation.describe()}")
        if layer == AUTO:
            from .layer_choice import TorchLayers

            layer = choose(TorchLayers(model))

        source = f"--run {run_dir}" if run_dir is not None else f"--model {model_file} --weights {weights}"
        # the rows the reference projection is fitted on: the audit's, in the paired route (export/effect.py)
        own = (artifact, clean) if not paired else _samples(train, samples, None, None)[:2] if samples and train is not None else None
        judged = _artifact_probe(train, test, attack, samples, artifact if not paired else None, paste,
                                 _rows_route(model, layer, *own, held_out) if own is not None else None, min_removed,
                                 _better_route(paired, samples, source, layer, run_dir, out))

        def fitted(contrast: np.ndarray):
            cav = fit_cav(model, layer, artifact, contrast, method, CLI_MODE, paired, n_directions)
            return cav, lambda gate: export_torch(model, layer, Correction.from_cav(cav, gate, threshold), probe, out, fold, cav.quality_,
                                                  held_out, judged, chosen)
    own_clean = None if own_rows is None else lambda: train.images[own_rows]  # read only where the plain projection is refused
    report, reactive, cav = _within_cost(fitted, clean, own_clean, reactive, held_out)
    print_table(f"unhans export -> {report.path}", {
        "correction": "reactive (inputs the detector flags)" if reactive else "plain (every input)",
        "tensor": report.tensor, "folded": report.folded, "nodes": f"{report.nodes_before} -> {report.nodes_after}",
        "max |onnxruntime - torch|": report.max_abs_diff, "max |logit|": report.logit_scale,
        "max |score - detector|": "no detector" if report.score_max_abs_diff is None else report.score_max_abs_diff,
        "correction spec": report.spec_path, "seconds": report.seconds, "cav fingerprint": report.metadata["unhans.cav.fingerprint"],
        "cav held-out detection accuracy": f"{cav.quality_['heldout_detection_acc']:.3g} ({cav.quality_['folds']}-fold, "
                                           f"{cav.quality_['samples']} samples, {cav.quality_['dims']} dimensions)",
        "directions removed": _subspace_summary(cav.quality_),
    })
    for warning in cav.quality_["warnings"]:
        warn(f"CAV: {warning}")
    _print_cost(report.cost)
    if report.effect is not None:
        print_table(f"what the correction does to the artifact (class {report.effect.class_name})", report.effect.describe())
        if report.effect.removed is None and held_out.baseline is not None:
            results.print("the fine-tuned model no longer follows the artifact (neither its rows nor held-out pairs show an effect "
                          "to remove): A-ClArC removed it; the correction keeps the artifact score")
        elif report.effect.removed is None:
            warn("the correction's effect on the artifact could not be judged: neither the artifact rows nor held-out pairs show "
                 "an effect the model's prediction depends on; check the corrected model on images with the artifact")
    if explain:  # after the prediction graph is written: an unexplainable model still gets that
        from ..core.layers import insert_after
        from .explain import MONITOR_LAYER, explain_path, export_explain

        correction = Correction.from_cav(cav, reactive, threshold)
        explained = export_explain(insert_after(model, layer, correction.module()), explain_path(out), composite, MONITOR_LAYER,
                                   probe=np.concatenate([artifact[:EXPLAIN_PROBE_ROWS], clean[:EXPLAIN_PROBE_ROWS]]), detector=correction)
        print_table(f"unhans export --explain -> {explained.path}", {**explained.figures, "seconds": explained.seconds})


@click.command("aclarc")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Run folder written by 'unhans train'.")
@click.option("--samples", type=click.Path(dir_okay=False),
              help="The audit's samples.npz ('unhans audit --select'): its artifact rows' own regions are pasted, and the rows left out. "
                   "Default: the artifact the run was trained with.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to write the fine-tuned model to.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=ACLARC_FRACTION, show_default=True,
              help="Share of the training images the artifact is pasted into (labels kept).")
@click.option("--epochs", type=click.IntRange(1), default=ACLARC_EPOCHS, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=ACLARC_LR, show_default=True, help="Adam's learning rate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-cost", type=click.FloatRange(0), default=MAX_COST_PT, show_default=True,
              help="Points of clean accuracy the fine-tuning may cost overall; more and nothing is written.")
@click.option("--max-class-cost", type=click.FloatRange(0), default=MAX_CLASS_COST_PT, show_default=True,
              help="Points of clean accuracy it may cost any one class.")
def aclarc_command(run_dir, samples, out_dir, fraction, epochs, lr, seed, max_cost, max_class_cost):
    """A-ClArC: fine-tune a run's model with its artifact pasted into images of every class, so it stops predicting.

    For an artifact a projection cannot remove: one at a different place in every image, on a model whose head has
    weights per position (a Flatten into a dense layer). With --samples the artifact is what the audit found, each
    selected row's own most relevant pixels, wherever they sit; those rows are left out of the fine-tuning, since in
    a backdoor they carry the wrong label. Writes OUT as a run folder of its own (export it as any run), after
    measuring what the fine-tuning costs on the run's clean test set, per class: over --max-cost or --max-class-cost
    nothing is written.
    """
    import shutil

    import torch

    from ..core.artifacts import Transplant
    from ..core.clarc import aclarc
    from ..core.run_folder import DATASET_FILE, METRICS_FILE, MODEL_FILE, WEIGHTS_FILE
    from ..core.training import attack_success, load_run, probabilities

    run, out = Path(run_dir), Path(out_dir)
    for name in (MODEL_FILE, WEIGHTS_FILE, DATASET_FILE):
        if not (run / name).is_file():
            raise InputError("--run", f"{run / name} is missing", "pass a run folder written by 'unhans train'")
    if out.resolve() == run.resolve():
        raise InputError("--out", f"{out} is the run itself", "write the fine-tuned model to a folder of its own")
    model, train, test, attack, artifact = load_run(run)
    exclude = None
    if samples:
        exclude, regions = _artifact_regions(samples, train)
        artifact = Transplant(train.images[exclude], regions)
    elif not train.has_artifact.any():
        raise InputError("--samples", f"{run} was trained without an artifact, so none is known to paste",
                         "run 'unhans audit --run RUN --select auto' and pass its samples.npz")
    tuned = aclarc(model, train, artifact, fraction, epochs, lr, seed, exclude=exclude)
    held_out = _held_out(run, test, None, "", max_cost, max_class_cost)  # a run A-ClArC tuned before: judged against its source
    cost = held_out.cost(probabilities(model, test.images), probabilities(tuned, test.images))
    _print_cost(cost, "what the fine-tuning costs")
    cost.check()
    out.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, DATASET_FILE):
        shutil.copyfile(run / name, out / name)
    torch.save(tuned.state_dict(), out / WEIGHTS_FILE)
    metrics = {
        "clean_acc_before": cost.overall.before, "clean_acc": cost.overall.after,
        "attack_success_before": attack_success(model, attack, train.target), "attack_success": attack_success(tuned, attack, train.target),
        "aclarc": {"source_run": str(run), "samples": samples, "left_out": 0 if exclude is None else len(exclude),
                   "fraction": fraction, "epochs": epochs, "lr": lr, "seed": seed},
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    print_table(f"A-ClArC fine-tuning of {run} -> {out}", {k: v for k, v in metrics.items() if k != "aclarc"})


def _artifact_regions(path: str, train, required: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """The artifact rows of an audit's samples file and each one's region (H, W), checked against the run's training set
    (sorted; without ``required`` a file with no regions gives None for them)."""
    n, image_shape = len(train), train.image_shape[1:]
    try:
        with np.load(path, allow_pickle=False) as z:
            _check_audited_data(z, path, train)
            rows = _index(z, SAMPLES.artifact, n, path)
            if SAMPLES.regions not in z and not required:
                return np.sort(rows % n), None
            if SAMPLES.regions not in z:
                raise InputError("--samples", f"{path} has no {SAMPLES.regions!r}: where the artifact lies in each row",
                                 "select again with this version ('unhans audit --run RUN --out AUDIT --select auto' reuses the audit)")
            regions = np.asarray(z[SAMPLES.regions], bool)
    except InputError:
        raise
    except (OSError, ValueError) as error:
        raise InputError("--samples", f"cannot read {path} ({error})", "pass the samples.npz 'unhans audit --select' wrote") from None
    if regions.shape != (len(rows), *image_shape):
        raise InputError("--samples", f"{path} has {regions.shape[:1]} regions of {regions.shape[1:]} px for {len(rows)} rows of "
                         f"{tuple(image_shape)} px", "select again from an audit of this run")
    rows = rows % n  # negative indices as the run's rows
    order = np.argsort(rows)
    return rows[order], regions[order]


def _within_cost(fitted, clean: np.ndarray, own_clean, reactive: bool | None, held_out: HeldOut):
    """(report, gate, CAV): the correction ``fitted(contrast)`` gives, as asked; by default the plain projection,
    unless its cost is refused, then the plain one fitted against the clean rows of the artifact rows' own classes
    (``own_clean()``, where given), then the reactive gate of the first.

    The plain projection touches every input. Where the artifact co-occurs with its class's own images, the direction
    from the other classes' clean images holds the class too, and removing it costs the class (MNIST, a corner patch
    on 45% of the 0s: 15 points of clean accuracy). Against the clean images of that class the direction is the
    artifact's alone: 0.2 points, attack success 22% -> 0.8% (a frame: 62% -> 2.6%), where the reactive gate of the first
    direction cut only to 18%: the other classes' images carrying the patch lack the class, so its detector missed them.
    For a backdoor the artifact rows' label is the target's, not their content's, so the own-class direction holds
    the other classes' shapes, and it is the first that passes (that way round it cost 11-12 points). The cost
    decides, so only with labelled held-out data: judged on the CAV's own clean samples, a correction fitted on a wrong
    cluster moves none of them and would pass unseen.
    """
    cav, write = fitted(clean)
    if reactive is not None:
        return write(reactive), reactive, cav
    try:
        return write(False), False, cav
    except InputError as refused:
        if refused.argument not in COST_FLAGS or held_out.labels is None:
            raise
        why = refused.problem.removesuffix("; nothing was written")
    refused_as = "the plain projection is refused"
    if own_clean is not None:
        contrast = own_clean()
        warn(f"the plain projection is refused ({why}): fitting it again against the clean images of the artifact samples' "
             f"own classes ({len(contrast)}), as for an artifact that co-occurs with its class")
        own_cav, own_write = fitted(contrast)
        try:
            return own_write(False), False, own_cav
        except InputError as refused:
            if refused.argument not in COST_FLAGS:
                raise
            why, refused_as = refused.problem.removesuffix("; nothing was written"), "the own-class projection is refused too"
    warn(f"{refused_as} ({why}): writing the reactive one, "
         "which corrects only inputs its detector flags (--plain insists on the plain one)")
    return write(True), True, cav


def _subspace_summary(quality: dict) -> str:
    """k, and how much of the paired differences the k directions hold (on the fitting pairs, and held out)."""
    text = str(quality["directions"])
    if quality["paired"]:
        text += f" ({quality['energy_share']:.0%} of the paired differences' energy"
        text += f", {quality['heldout_energy_share']:.0%} on held-out pairs)" if "heldout_energy_share" in quality else ")"
    return text


def _print_cost(cost, title: str = "what the correction costs") -> None:
    """The cost overall and for the classes it hits hardest; a loud warning when a raised bound let it through."""
    def figure(c):
        return f"{c.before:.1%} -> {c.after:.1%} ({c.pt:+.1f} pt, {c.samples} images)"

    worst = cost.worst_class
    shown = sorted(cost.classes, key=lambda c: -c.pt)[:COST_CLASSES_SHOWN]
    print_table(f"{title}: {cost.metric} on {cost.source}", {
        "overall": f"{figure(cost.overall)}; {cost.noise()}",
        "top-1 agreement with the uncorrected model": f"{cost.agreement:.1%}",
        **{f"class {c.name}": figure(c) + ("" if c.samples >= MIN_CLASS_SAMPLES else "; too few images to judge") for c in shown},
    })
    if MAX_COST_PT < cost.overall.pt and cost.max_pt > MAX_COST_PT and not cost.over_bound:
        warn(f"the correction costs {cost.overall.pt:.1f} points of {cost.metric} (accepted with --max-cost {cost.max_pt:g})")
    elif cost.max_pt < cost.overall.pt and not cost.over_bound:
        results.print(f"{cost.changes} of {cost.overall.samples} images change their top-1 class ({cost.overall.pt:.1f} pt): within "
                      f"what a correction at the bound of {cost.max_pt:g} pt shows on {cost.overall.samples} images", highlight=False)
    if worst is not None and MAX_CLASS_COST_PT < worst.pt <= cost.max_class_pt:
        warn(f"the correction costs class {worst.name} {worst.pt:.1f} points of {cost.metric} (accepted with --max-class-cost {cost.max_class_pt:g})")


@click.command("inspect")
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as one JSON object.")
def inspect_command(onnx_file, as_json):
    """Print what an ONNX file says about itself: unhans's correction metadata, inputs and outputs."""
    import onnx

    from .onnx import META, read_metadata

    metadata = read_metadata(onnx_file)
    if as_json:
        click.echo(json.dumps(metadata, indent=2))
        return
    model = onnx.load(onnx_file, load_external_data=False)

    def signature(values):
        dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        return ", ".join(f"{v.name}{dims(v)}" for v in values)

    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    print_table(f"{onnx_file}", {"inputs": signature(model.graph.input), "outputs": signature(model.graph.output),
                            "nodes": len(model.graph.node), "ir version": model.ir_version, "opsets": opsets, **metadata})
    if META + "layer.trials" in metadata:
        trials = json.loads(metadata[META + "layer.trials"])
        print_table(f"--layer auto chose {metadata.get(META + 'correction.layer')} ({metadata.get(META + 'layer.split')})",
                    {t["layer"]: " | ".join(f"{k} {v}" for k, v in t.items() if k != "layer") for t in trials})
    if not any(key.startswith("unhans.") for key in metadata):
        results.print("no unhans correction recorded in this file")
    elif META + EFFECT.removed in metadata:
        removed = metadata[META + EFFECT.removed]
        said = "its effect on the artifact was not judged" if removed == "not judged" else f"it removes {float(removed):.0%} of the artifact's effect"
        results.print(f"measured before the correction was written: {said} (class {metadata.get(META + EFFECT.class_)}, bound "
                      f"{metadata.get(META + EFFECT.bound)}; unhans.effect.*)", highlight=False)


@click.command("archive")
@click.option("--onnx", "onnx_file", type=click.Path(dir_okay=False),
              help="Graph written by 'unhans export'; without it, the model (--model/--weights or --run) is archived as it is, with no correction, to watch it before patching.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="Run folder the graph was exported from (or --model/--weights, or neither).")
@click.option("--model", "model_file", type=click.Path(dir_okay=False), help="The PyTorch twin: your model file (relevance without an explain graph).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Its state_dict (with --model).")
@click.option("--classes", type=click.Path(dir_okay=False), help="Class names: a text file with one a line, or index_to_name.json (default: numbers).")
@contract_options
@click.option("--name", required=True, help="Model name: TorchServe serves it at /predictions/NAME.")
@click.option("--model-store", default="model_store", show_default=True, type=click.Path(file_okay=False))
@click.option("--batch-size", type=click.IntRange(1), default=ServingConfig.batch_size, show_default=True, help="Requests answered together (TorchServe's batch size; the KServe predictor's too).")
@click.option("--max-batch-delay", type=click.IntRange(0), default=ServingConfig.max_batch_delay_ms, show_default=True, help="Milliseconds TorchServe waits to fill a batch.")
@click.option("--workers", type=click.IntRange(1), default=ServingConfig.workers, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=ServingConfig.intra_op_threads, show_default=True, help="onnxruntime intra-op threads per worker.")
@click.option("--topk", type=click.IntRange(1), default=ServingConfig.topk, show_default=True)
@click.option("--sample-fraction", type=float, default=SampleConfig.fraction, show_default=True,
              help="Share of served instances recorded with their relevance for 'unhans monitor'.")
@click.option("--sink", help="Where sampled records go: a folder or an fsspec URL such as s3://bucket/unhans (default: $UNHANS_SINK, else ./unhans-sink of TorchServe).")
@click.option("--max-shard-seconds", type=click.FloatRange(0, min_open=True), default=SampleConfig.max_shard_seconds, show_default=True,
              help="Close a sink shard after this long: the monitor reads closed shards only, so this bounds its delay.")
@click.option("--sample-cpu-budget", type=float, default=SampleConfig.cpu_budget, show_default=True,
              help="Share of one core each worker may spend on relevance for sampled instances (1 = no cap); beyond it samples are dropped and counted.")
@click.option("--monitor-layer", help="Layer whose relevance per channel sampled records carry for the monitor (default: the explain graph's, else the block halfway through the model).")
@click.option("--force", is_flag=True, help="Replace an archive of the same name.")
def archive_command(onnx_file, run_dir, model_file, weights, classes, size, channels, resize, mean, std, name, model_store, batch_size,
                    max_batch_delay, workers, threads, topk, sample_fraction, sink, max_shard_seconds, sample_cpu_budget, monitor_layer, force):
    """Package a corrected graph, its PyTorch twin and a handler as MODEL_STORE/NAME.mar for TorchServe.

    The input contract (--size, --resize, --mean, --std) is what the handler applies to every PNG/JPEG body.
    """
    from .archive import build_archive

    if run_dir is not None and model_file is not None:
        raise InputError("--run/--model", "name the model once", "pass --run, or --model and --weights")
    path = build_archive(onnx_file, run_dir, name, model_store, force=force, batch_size=batch_size, max_batch_delay_ms=max_batch_delay,
                         workers=workers, topk=topk, threads=threads, sample_fraction=sample_fraction, sink=sink, max_shard_seconds=max_shard_seconds,
                         sample_cpu_budget=sample_cpu_budget, model_file=model_file, weights=weights, classes=classes,
                         contract=contract_from_options(size, channels, resize, mean, std), monitor_layer=monitor_layer)
    print_table(f"unhans archive -> {path}", {
        "serve": f"torchserve --start --ncs --model-store {model_store} --models {name}={path.name} --ts-config {model_store}/config.properties",
        "predict": f"curl -H 'Authorization: Bearer <inference key from key_file.json>' http://127.0.0.1:8080/predictions/{name} -T image.png",
    })
