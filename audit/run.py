"""``unhans audit``: relevance for a whole labelled dataset, SpRAy per class, a ranking, a report, a ViRelAy project.

Relevance is computed in batches and stored as it goes (:class:`~unhans.audit.store.RelevanceStore`), so an interrupted audit resumes.
Both the relevance batches and the per-class SpRAy fits go through joblib: in-process by default, or on an
existing Dask cluster when a scheduler address is given (workers receive the model's source and weights, not
paths, so they need no shared disk).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from joblib import Parallel, delayed, parallel_config
from rich.console import Console
from rich.progress import Progress

from unhans.core.attribution import LRP
from unhans.core.errors import InputError
from unhans.core.layers import positions_axes
from unhans.core.models import load_model
from unhans.core.spray import ClassResult, rank_classes

from .clusters import Intervention, rank_by_evidence, summary
from .samples import SAMPLES, SAMPLES_FILE, data_fingerprint
from .spec import AUTO_POOLING, INPUT, LATENT, MAX, SUM, AuditSpec
from .report import write_report
from .store import RelevanceStore
from .virelay import write_virelay_project

ANALYSED = "analysed"  # the stored relevance SpRAy runs on: the input maps, or a layer's pooled over positions
console = Console(stderr=True)


_LRP_CACHE: dict[str, LRP] = {}


def _explain_batch(model_source: str, state: bytes, key: str, composite: str, layer: str, over_positions: str, images: np.ndarray,
                   targets: np.ndarray):
    """Relevance of one batch; runs wherever joblib sends it and keeps one LRP (hooks registered) per process."""
    lrp = _LRP_CACHE.get(key)
    if lrp is None:
        import tempfile

        from unhans.core.models import model_class_from_file

        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(model_source)
        model = model_class_from_file(f.name)()
        model.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
        # checked once by run_audit before any batch: this copy (per process) is the same model
        lrp = _LRP_CACHE[key] = LRP(model.eval(), composite, layers=() if layer == INPUT else (layer,), check=False)
    explanation = lrp(torch.from_numpy(images), targets)
    latent = explanation.layer_relevance.get(layer, explanation.relevance)
    analysed = latent
    axes = positions_axes(latent.shape) if layer != INPUT else ()
    if axes:  # maps (N, C, H, W) or transformer tokens (N, T, D): pooled over positions
        analysed = latent.max(axis=axes) if over_positions == MAX else latent.sum(axis=axes)
    return {INPUT: explanation.relevance, "logits": explanation.logits, ANALYSED: analysed}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fingerprint(spec: AuditSpec, dataset) -> dict:
    """What the stored relevance depends on: the contents of model, weights and data, the composite, the layer and how
    its relevance is pooled over positions (as asked: ``auto`` resolves the same way for the same model)."""
    return {"model": _sha256(Path(spec.model_file)), "weights": _sha256(Path(spec.weights)), "data": data_fingerprint(dataset.images, dataset.labels),
            "composite": spec.composite, "layer": spec.layer, "layer_relevance": f"pooled over positions: {spec.over_positions}"}


def _inputs(spec: AuditSpec, dataset) -> dict:
    """What an audit's results depend on: the relevance's fingerprint and SpRAy's settings."""
    return {**_fingerprint(spec, dataset), "n_neighbors": spec.n_neighbors, "pooling": spec.pooling, "embedding_2d": spec.embedding_2d}


def finished_audit(spec: AuditSpec) -> dict | None:
    """OUT/audit.json when it was written for this very model, data and settings (so picking clusters from it needs
    no second audit), else None."""
    path = Path(spec.out_dir) / "audit.json"
    if not path.is_file():
        return None
    audit = json.loads(path.read_text())
    if audit.get("inputs") != _inputs(spec, spec.dataset()):
        return None
    return audit


def run_audit(spec: AuditSpec, restart: bool = False) -> list[ClassResult]:
    """Run (or resume) an audit; writes OUT/relevance/, audit.json, report.html and virelay/; returns the ranking."""
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = load_model(spec.model_file, spec.weights)
    dataset = spec.dataset()
    if dataset.skipped:
        console.print(f"[yellow]skipped {len(dataset.skipped)} unusable images[/] (listed in {out / 'skipped.txt'})")
        (out / "skipped.txt").write_text("\n".join(dataset.skipped) + "\n")
    with torch.no_grad():
        outputs = model(torch.from_numpy(dataset.images[:2]))
    if outputs.shape[1] != dataset.num_classes:
        raise InputError(spec.data, f"has {dataset.num_classes} classes but the model predicts {outputs.shape[1]}",
                         "audit the model on the data it was trained for (same classes, same order), or pass --classes "
                         "with its class names to audit some of its classes")
    layer = _analysed_layer(spec.layer, model, torch.from_numpy(dataset.images[:2]))
    over_positions = _pooled(spec.over_positions, model, torch.from_numpy(dataset.images[:2]))
    with LRP(model, spec.composite) as lrp:  # a model whose LRP is not conservative is refused here, before any work
        conservation = lrp.check(torch.from_numpy(dataset.images[:8]))
    console.print(f"LRP canonization: {lrp.canonization.summary()}; {conservation.describe()}")

    fingerprint = _fingerprint(spec, dataset)
    store_path = out / "relevance"
    if restart:
        RelevanceStore.discard(store_path)
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    model_source = Path(spec.model_file).read_text()
    state = Path(spec.weights).read_bytes()
    with _backend(spec) as parallel_args, nullcontext(RelevanceStore(store_path, len(dataset), spec.batch_size, fingerprint)) as store:
        pending = store.pending()
        computed_here = len(pending) / store.num_batches
        with Progress(console=console) as progress:
            task = progress.add_task(f"relevance ({spec.composite}, at the input and {layer})", total=store.num_batches,
                                     completed=store.num_batches - len(pending))
            jobs = (delayed(_explain_batch)(model_source, state, key, spec.composite, layer, over_positions,
                                            dataset.images[store.rows(b)], dataset.labels[store.rows(b)]) for b in pending)
            for batch, arrays in zip(pending, Parallel(return_as="generator", **parallel_args)(jobs)):
                store.write(batch, arrays)
                progress.advance(task)
        arrays = store.read()
        relevance, analysed = arrays[INPUT], arrays[ANALYSED]

        # the data's own classes, empty ones too; of the model's named classes, those the data holds
        audited = range(dataset.num_classes) if spec.classes is None else np.unique(dataset.labels)
        console.print(f"SpRAy on {len(audited)} classes")
        ranked = rank_classes(analysed, dataset.labels, classes=audited, n_jobs=parallel_args["n_jobs"],
                              n_neighbors=spec.n_neighbors, pooling=spec.pooling, embedding_2d=spec.embedding_2d)
    evidence = _intervene(model, dataset, relevance, ranked)
    ranked = rank_by_evidence(ranked, evidence)
    seconds = time.perf_counter() - started

    where = "input maps" if layer == INPUT else f"relevance at {layer}, {'its peak' if over_positions == MAX else 'summed'} over positions"
    notes = [f"model {spec.model_file}, data {spec.data} ({len(dataset)} samples), composite {spec.composite}; SpRAy on {where}",
             f"LRP canonization: {lrp.canonization.summary()}; {conservation.describe()}",
             f"{computed_here:.0%} of relevance batches computed in this run (the rest resumed from {store_path.name}/); {seconds:.1f} s"]
    notes += [f"class {dataset.classes[r.class_index]}: {r.skipped}" for r in ranked if r.skipped]
    write_report(out, "unhans audit", ranked, dataset.classes, dataset.images, relevance, evidence, notes, pictures=spec.pictures)
    write_virelay_project(out / "virelay", "unhans audit", Path(spec.model_file).name, spec.pictures(dataset.images), dataset.labels,
                          dataset.classes, relevance, arrays["logits"], spec.composite, [
                              {"class_index": r.class_index, "index": r.indices, "labels": r.labels, "eigenvalues": r.eigenvalues,
                               "eigenvectors": r.spray.eigenvectors_, "embedding_2d": r.spray.embedding_2d_} for r in ranked if r.spray is not None])
    (out / "audit.json").write_text(json.dumps({
        "spec": spec.__dict__, "analysed_layer": layer, "over_positions": over_positions, "inputs": _inputs(spec, dataset), "seconds": seconds, "conservation": conservation.__dict__, "computed_fraction_this_run": computed_here, "skipped_images": len(dataset.skipped),
        "classes": [{**r.summary(), "class": dataset.classes[r.class_index], **(summary(evidence[r.class_index]) if r.spray is not None else {})}
                    for r in ranked],
        "clusters": {str(r.class_index): {"rows": r.indices.tolist(), "labels": r.labels.tolist()} for r in ranked if r.spray is not None},
    }, indent=1))
    return ranked


def _analysed_layer(layer: str, model, probe: torch.Tensor) -> str:
    """The layer whose relevance SpRAy analyses; an unknown name fails here, with the valid names, before any work.

    Latent by default: pooled over positions (:func:`_pooled`), an artifact lands in the same channels wherever it sits. Measured on
    MNIST-5k (VGG-style, features = its last conv block): a "©" at random positions, 5% backdoor to 0, gave a cluster
    of precision 0.98 / recall 0.87 there and nothing at the input (best cluster 0.38 / 0.86); patch and frame
    backdoors split exactly (ARI 1.0) at both.

    A transformer is analysed at its patch embedding (core.layers.patch_embedding_layer), where its correction goes too:
    attention mixes an artifact into every token, so at the end of the encoder it is a blur. Measured on the small ViT
    (MNIST-5k, 5x5 corner patch, 5% backdoor, 12 epochs): summed over tokens, class 0 ranked 6th by SpRAy at the end
    of the encoder, its best cluster 0.60 precision / 0.92 recall; at the patch embedding it ranked 1st and split
    exactly (1.00 / 1.00, λ₂ = 0), summed or at its peak.
    """
    from unhans.core.layers import get_layer, last_spatial_layer, patch_embedding_layer

    if layer == INPUT:
        return INPUT
    if layer == LATENT:
        return patch_embedding_layer(model, probe) or last_spatial_layer(model, probe)
    get_layer(model, layer)
    return layer


def _pooled(over_positions: str, model, probe: torch.Tensor) -> str:
    """How a layer's relevance is pooled over positions: as asked, or by the model's head (``auto``).

    Where the model pools globally (ResNet, EfficientNet), every position feeds the same weights, so a channel's summed
    relevance mixes an artifact's share with the object's; its peak says whether the channel fired strongly
    *anywhere*, which is what an artifact that moves does. Measured on MNIST-5k, a "©" at a random place in 10% of
    the other classes' images relabelled 0: on SmallResNet (global average pooling) the best cluster held 81 of the
    360 tagged rows in 105 summed, 345 in 347 with the peak. On the VGG, which flattens into a dense layer (every
    position its own weights), the sum is the better one: 356 tagged rows of 369 summed, against clusters of 235 in
    254 and 62 in 63 with the peak; a frame on class 0's own images split in two mixed clusters with the peak.
    """
    from unhans.core.layers import global_pooling_layer

    if over_positions not in (SUM, MAX, AUTO_POOLING):
        raise InputError("--over-positions", f"{over_positions!r} is unknown", f"use {SUM}, {MAX} or {AUTO_POOLING}")
    if over_positions != AUTO_POOLING:
        return over_positions
    return MAX if global_pooling_layer(model, probe) else SUM


def _intervene(model, dataset, relevance: np.ndarray, ranked: list[ClassResult]) -> dict:
    """The transplant test of every analysed class's clusters (audit/clusters.py), with progress."""
    analysed = [r for r in ranked if r.spray is not None]
    from unhans.core.layers import patch_embedding_layer

    token_grid = patch_embedding_layer(model, torch.from_numpy(dataset.images[:2])) is not None  # a transformer's input relevance
    intervention = Intervention(model, dataset.images, dataset.labels, relevance, token_grid=token_grid)
    evidence = {}
    with Progress(console=console) as progress:
        task = progress.add_task("artifact evidence (transplanting each cluster's most relevant pixels)", total=len(analysed))
        for result in analysed:
            evidence[result.class_index] = intervention.of_class(result)
            progress.advance(task)
    return evidence


class _backend:
    """joblib settings: in-process by default, or the Dask cluster at ``spec.scheduler``."""

    def __init__(self, spec: AuditSpec):
        self.spec = spec
        self.client = None
        self.config = None

    def __enter__(self) -> dict:
        if not self.spec.scheduler:
            return {"n_jobs": self.spec.n_jobs}
        from distributed import Client

        try:
            self.client = Client(self.spec.scheduler, timeout="10s")
        except (OSError, TimeoutError) as error:
            raise InputError("--scheduler", f"cannot reach the Dask scheduler at {self.spec.scheduler} ({error})", "start it or check the address") from None
        self.config = parallel_config(backend="dask")
        self.config.__enter__()
        return {"n_jobs": -1}

    def __exit__(self, *exc):
        if self.config is not None:
            self.config.__exit__(*exc)
        if self.client is not None:
            self.client.close()


AUTO = "auto"


def marked_selection(audit: dict) -> str:
    """``CLASS:CLUSTER[,...]`` of the audit's own choice: the artifact clusters of the highest-ranked class that has any.

    One class only: a second marked class is a second artifact, which needs a CAV of its own.
    """
    from .clusters import nearest_miss

    for found in audit["classes"]:
        if found.get("artifact_clusters"):
            return ",".join(f"{found['class_index']}:{cluster}" for cluster in found["artifact_clusters"])
    closest = nearest_miss(audit["classes"])
    raise InputError("--select auto", "the audit found no artifact cluster" + (f" ({closest})" if closest else ""),
                     "look at report.html, and pick a cluster with --select CLASS:CLUSTER if you see one")


def parse_selection(text: str) -> list[tuple[str, int]]:
    """``CLASS:CLUSTER[,CLASS:CLUSTER...]`` as (class, cluster) pairs; checked before any work, so a typo costs nothing."""
    pairs = []
    for item in text.split(","):
        name, sep, cluster = item.strip().rpartition(":")
        if not sep or not name or not cluster.isdigit():
            raise InputError("--select", f"{item.strip()!r} is not CLASS:CLUSTER", "write e.g. --select 0:1, or --select 3:0,3:2 for two clusters")
        pairs.append((name, int(cluster)))
    return pairs


def select_samples(out_dir: str | Path, class_cluster: str | None = None, ids: np.ndarray | None = None, by_pattern: bool = True) -> Path:
    """Write OUT/samples.npz: ``artifact`` (dataset rows in the chosen clusters, ``CLASS:CLUSTER[,CLASS:CLUSTER...]``, or
    the given row ids or boolean mask) and ``clean`` (every other row), the sets ``unhans export --samples`` fits the
    CAV on, with each artifact row's region and the audited data's fingerprint (audit/samples.py).

    The clusters' rows are replaced by the rows of their class that show the clusters' artifact: their region's pixels
    at its place or, where it moves, the pattern they share (audit/pattern.py; ``by_pattern=False`` keeps the
    clusters' rows); given ids are taken as they are."""
    out = Path(out_dir)
    audit_file = out / "audit.json"
    if not audit_file.exists():
        raise InputError(str(out), "holds no finished audit (audit.json)", "run 'unhans audit' into it first")
    audit = json.loads(audit_file.read_text())
    n = sum(c["n"] for c in audit["classes"])
    if class_cluster is not None:
        chosen = []
        for class_name, cluster in parse_selection(class_cluster):
            match = [c for c in audit["classes"] if class_name in (c["class"], str(c["class_index"]))]
            if not match or str(match[0]["class_index"]) not in audit["clusters"]:
                raise InputError("--select", f"class {class_name!r} has no clusters in this audit", "use CLASS:CLUSTER from the report's ranking")
            found = audit["clusters"][str(match[0]["class_index"])]
            labels = np.asarray(found["labels"])
            if cluster not in set(labels.tolist()):
                raise InputError("--select", f"cluster '{cluster}' of class {class_name} does not exist", f"use one of {sorted(set(labels.tolist()))}")
            chosen.append(np.asarray(found["rows"])[labels == cluster])
        rows = np.concatenate(chosen)
    else:
        ids = np.asarray(ids)
        if ids.dtype == bool:
            if ids.shape != (n,):
                raise InputError("--select-ids", f"the mask has shape {ids.shape} for {n} samples", "pass one boolean per dataset row")
            rows = np.flatnonzero(ids)
        else:
            rows = np.unique(ids.astype(np.int64))
        if rows.size == 0 or rows.min() < 0 or rows.max() >= n:
            raise InputError("--select-ids", f"selects no row in 0..{n - 1}", "pass dataset row numbers or a boolean mask")
    from .pattern import PATTERN_FILE, pattern_of_selection
    from .region import selection_inputs, write_selection_region

    inputs = selection_inputs(out, audit, console)
    how = {"selection": class_cluster or f"{len(np.unique(rows))} rows by id"}
    (out / PATTERN_FILE).unlink(missing_ok=True)  # a pattern of an earlier selection says nothing of this one
    if inputs is not None and class_cluster is not None and by_pattern:
        pattern, why = pattern_of_selection(inputs, rows, console)
        if why:
            console.print(f"[yellow]{why}[/]")
        if pattern is not None:
            from PIL import Image

            Image.fromarray(pattern.rgba(), "RGBA").save(out / PATTERN_FILE)
            h, w = pattern.template.shape[:2]
            shared, where = (("the artifact moves, and the selected rows share", "anywhere") if pattern.place is None else
                             ("the selected rows' region is", f"at {pattern.place[0]},{pattern.place[1]}"))
            by_pixels = (f" ({pattern.kept_by_pixels} of them under the match's bar, where the object's strokes cross the box, but "
                         "showing the artifact's own pixels)" if pattern.kept_by_pixels else "")
            dropped = pattern.selected - pattern.kept
            console.print(f"{shared} a {h}x{w}-px image pattern ({out / PATTERN_FILE}; it tells them from the rest of their class "
                          f"with an AUC of {pattern.separation:.2f}): {len(pattern.rows)} rows of their class show it {where}, "
                          f"{pattern.kept} of the {pattern.selected} selected{by_pixels} and {pattern.added} more"
                          + (f"; {dropped} selected rows {'match it below the bar' if pattern.place is None else 'show none of its pixels'} "
                             "and are dropped" if dropped else "")
                          + "; those rows are the artifact samples (--cluster-rows keeps the clusters' rows)", markup=False, highlight=False)
            rows = pattern.rows
            how["pattern"] = {**pattern.figures(), "image": PATTERN_FILE}
    artifact = np.zeros(n, bool)
    artifact[rows] = True
    path = out / SAMPLES_FILE
    arrays = {SAMPLES.artifact: np.flatnonzero(artifact), SAMPLES.clean: np.flatnonzero(~artifact), SAMPLES.data: np.asarray(audit["inputs"]["data"])}
    regions = _regions(out, arrays[SAMPLES.artifact])
    if regions is not None:
        arrays[SAMPLES.regions] = regions
    np.savez_compressed(path, **arrays)
    if inputs is not None:  # the region, for export --artifact-image, and the commands that correct the model
        write_selection_region(out, audit, inputs, np.flatnonzero(artifact), how, console)
    return path


def _regions(out: Path, rows: np.ndarray) -> np.ndarray | None:
    """Each row's region (audit.clusters.region of its stored input relevance), or None (a line says why) where the
    stored relevance does not cover the rows."""
    from .clusters import region
    from .store import StoredRelevance

    try:
        store = StoredRelevance(out / "relevance")
        masks = [region(relevance) for _, batch in store.rows(INPUT, rows) for relevance in batch]
    except (InputError, KeyError, IndexError, OSError) as error:
        console.print(f"[yellow]no artifact regions written to {SAMPLES_FILE}[/] (unhans aclarc needs them): {error}")
        return None
    return np.stack(masks) if masks else None
