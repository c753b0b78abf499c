"""The artifact region of an audit's cluster: where its members' relevance points, cut out as an RGBA image.

``unhans export --artifact-image REGION.png --position ROW,COL`` pastes such an image into clean images, which gives
the *paired* contrast set (the same images with and without the artifact) that fits a reliable CAV.

The rule, and why:

1. Each member's input relevance is taken as |R| summed over channels and scaled to sum 1, so every image counts
   the same however confident the model is (LRP conserves the logit, which differs from image to image).
2. The cluster's mean map minus the mean map of the *rest of its class* (the clusters not selected), clipped at 0:
   the object itself is relevant in every cluster of the class, the artifact only in the artifact cluster, so the
   contrast keeps the artifact and drops the object. (With no rest of the class, the rest of the dataset.)
3. Hysteresis thresholds on the contrast, relative to its peak (so free of the relevance's scale): the connected
   pieces of the pixels at or above a quarter of the peak that reach half of the peak somewhere, with their holes
   filled. Half of the peak picks the artifact out of the noise; a quarter brings back its edges, because LRP's flat
   rule at the input spreads each first-layer neuron's relevance over its receptive field, so the map is a blurred
   copy of the artifact whose edge and corner pixels sit at a third to a half of the peak (a 5-px checker patch on
   MNIST: corners at 0.33 of the peak, the pixels just outside at 0.17-0.28; a half-maximum cut, even grown by a pixel, lost
   two corners). Every piece that reaches half of the peak is kept: an artifact in parts (a text) is not cut to one.
4. Its pixels are the per-pixel median of the members: an artifact that sits at the same place in every member is
   reproduced exactly, while the images behind it, which differ, do not survive a median.

An artifact with no place at all (stripes over the whole image, a colour cast, a border on every side, noise) has no
region either: what sets the cluster apart is spread over the image, and a cut at half its peak is a piece of it (on
MNIST, stripes on every 3rd row: a 13x9 corner, or three disjoint corner pieces, from which the paired correction left
56-94% attack success). So the contrast's spread is measured first: the share of the image's pixels that hold half its
positive mass (:attr:`Region.spread`). Above ``MAX_SPREAD`` the artifact is everywhere (:attr:`Region.everywhere`): no
region is offered, and the correction is fitted from the selected rows themselves.

A vision transformer's relevance is a token grid (the flat rule spreads each patch embedding's relevance over its
patch), and the model may lean on the one token that holds most of an artifact: on the small ViT (4-px patches) a
5x5 corner patch lying over four tokens gave 100% of the contrast's peak on its main token and 7-11% on the three
others, so the region was that token alone, and the paired correction fitted from it left 43% attack success. For
such a model (``by_pixels``) the region is grown by its pixels (:func:`grown_by_pixels`): the pieces, touching it, where
the members' median differs from the rest's by at least ``ARTIFACT_PIXEL`` of the largest difference inside it.

The region is stored cropped to its bounding box, alpha = the mask, and its position is the box's top-left corner.
It suits artifacts at a fixed place (a watermark, a logo, a tag in a corner). An artifact at a different place in
every image leaves no peak to cut: the region then lies where the class's object does, so the rest of the class is
relevant there too (:attr:`Region.moves`), and it may cover much of the image or little of the members' relevance;
:attr:`Region.warnings` says which.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .spec import INPUT, AuditSpec, audited_dataset

SEED = 0.5  # share of the contrast's peak a piece must reach somewhere
EDGE = 0.25  # share of the contrast's peak a pixel of the piece needs
MAX_AREA = 0.25  # a region over this share of the image is no localised artifact: warned
MIN_SHARE = 0.2  # a region holding less of the members' relevance than this explains little of it: warned
# The rest of the class's relevance in the region, as a share of the members': above this the region is where the
# class's object lies, and the members' artifact has no place of its own: it moves. Measured on MNIST-5k: fixed patch,
# text, frame 0.00-0.02; a "©" at a random place 0.41-0.57 (VGG, 2-10%, two seeds; SmallResNet, whose region covered
# only 15% of the image and so raised no other warning).
MAX_REST_SHARE = 0.25
# Share of the image's pixels that hold half of the contrast's positive mass, above which the artifact has no place.
MAX_SPREAD = 0.1
CLEAN_IMAGES = 256  # clean images written beside the region for `unhans export --images` (512 paired samples)
REGION_IMAGE, REGION_INFO, REGION_CLEAN = "artifact-region.png", "artifact-region.json", "region-clean"  # what --select writes


@dataclass
class Region:
    """An artifact region: ``mask`` (H, W) in image coordinates and ``pixels`` (C, H, W), both of the whole image."""

    mask: np.ndarray
    pixels: np.ndarray
    members: int = 0
    share: float = float("nan")  # of the members' relevance inside the mask
    rest_share: float = float("nan")  # of the rest's relevance inside the mask
    spread: float = float("nan")  # share of the image's pixels holding half of the contrast's positive mass
    grown: bool = False  # grown by the pixels the members share (grown_by_pixels: a transformer's token grid)
    warnings: list[str] = field(default_factory=list)

    @property
    def everywhere(self) -> bool:
        """Whether the artifact has no place: what sets the cluster apart is spread over the image (``MAX_SPREAD``), and
        not because it moves (:attr:`moves`: a tag at a different place in every image spreads too, but each copy is small)."""
        return bool(self.spread > MAX_SPREAD) and not self.moves  # NaN: False

    @property
    def moves(self) -> bool:
        """Whether the artifact has no place of its own: the rest of its class is as relevant in the region (``MAX_REST_SHARE``)."""
        return bool(self.rest_share >= MAX_REST_SHARE * self.share)  # NaN (no rest to compare with): False

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(row, col, height, width) of the mask's bounding box."""
        rows, cols = np.nonzero(self.mask)
        return int(rows.min()), int(cols.min()), int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)

    @property
    def position(self) -> tuple[int, int]:
        return self.box[:2]

    def rgba(self) -> np.ndarray:
        """The region cropped to its box as (h, w, 4) uint8: colour (grey repeated for one channel), alpha = mask."""
        row, col, h, w = self.box
        colour = self.pixels[:, row:row + h, col:col + w]
        colour = np.repeat(colour, 3, axis=0) if colour.shape[0] == 1 else colour[:3]
        alpha = self.mask[None, row:row + h, col:col + w].astype(np.float32)
        return np.round(np.clip(np.concatenate([colour, alpha]), 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)

    def save(self, path: str | Path) -> Path:
        from PIL import Image

        Image.fromarray(self.rgba(), "RGBA").save(path)
        return Path(path)

    def describe(self) -> dict:
        row, col, h, w = self.box
        return {"position": [row, col], "size": [h, w], "pixels": int(self.mask.sum()), "members": self.members,
                "members_relevance_share": self.share,
                "rest_relevance_share": None if np.isnan(self.rest_share) else self.rest_share,
                "contrast_spread": None if np.isnan(self.spread) else self.spread, "everywhere": self.everywhere, "warnings": self.warnings,
                "rule": f"contrast of normalised |relevance| (cluster minus rest of its class): connected pieces >= {EDGE} x "
                        f"peak that reach {SEED} x peak, holes filled"
                        + ("; grown by the pixels the members share (a transformer's token grid)" if self.grown else "")
                        + "; pixels: the members' per-pixel median"}


def mean_map(store, rows) -> tuple[np.ndarray | None, int]:
    """Mean over ``rows`` of each row's |input relevance| summed over channels and scaled to sum 1; and how many rows
    counted (a row with no relevance at all is skipped)."""
    total, counted = None, 0
    for _, relevance in store.rows(INPUT, rows):
        maps = np.abs(relevance.astype(np.float64)).sum(1)
        mass = maps.sum((1, 2))
        maps = maps[mass > 0] / mass[mass > 0, None, None]
        total = maps.sum(0) if total is None else total + maps.sum(0)
        counted += len(maps)
    return (None, 0) if counted == 0 else (total / counted, counted)


def spread(contrast: np.ndarray) -> float:
    """The share of the pixels that hold half of the contrast's positive mass (NaN where it has none): a few percent
    for an artifact with a place, a third of the image for stripes on every 3rd row."""
    ordered = np.sort(np.clip(contrast, 0, None).ravel())[::-1]
    total = ordered.sum()
    return float("nan") if total <= 0 else float((np.searchsorted(np.cumsum(ordered), 0.5 * total) + 1) / ordered.size)


def region_mask(contrast: np.ndarray) -> np.ndarray:
    """Step 3 of the rule on a contrast map (H, W): the pieces >= EDGE x peak that reach SEED x peak, holes filled."""
    contrast = np.clip(contrast, 0, None)
    peak = contrast.max()
    if peak <= 0:
        return np.zeros(contrast.shape, bool)
    pieces, _ = ndimage.label(contrast >= EDGE * peak, structure=np.ones((3, 3)))
    seeded = np.unique(pieces[contrast >= SEED * peak])
    return ndimage.binary_fill_holes(np.isin(pieces, seeded[seeded > 0]))


def cut_region(images: np.ndarray, mask: np.ndarray) -> Region:
    """The members' per-pixel median under ``mask`` (the rest of the image is left 0): step 4 of the rule."""
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    pixels = np.zeros(images.shape[1:], np.float32)
    pixels[:, r0:r1, c0:c1] = np.median(images[:, :, r0:r1, c0:c1], axis=0)
    return Region(np.asarray(mask, bool), pixels, members=len(images))


def grown_by_pixels(mask: np.ndarray, members: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """``mask`` (H, W) with the connected pieces that touch it (8-neighbours) of the pixels where the members' median
    image differs from the rest's by at least ``ARTIFACT_PIXEL`` of the largest such difference inside the mask: an
    artifact pasted at one place is the same in every member, the rest shows what lies behind it."""
    from .clusters import ARTIFACT_PIXEL, median_image

    difference = np.abs(median_image(members) - median_image(rest)).max(axis=0)
    peak = difference[mask].max()
    if peak <= 0:
        return mask
    pieces, _ = ndimage.label((difference >= ARTIFACT_PIXEL * peak) | mask, structure=np.ones((3, 3)))
    touched = np.unique(pieces[mask])
    return ndimage.binary_fill_holes(np.isin(pieces, touched[touched > 0]))


def find_region(store, images: np.ndarray, labels: np.ndarray, members: np.ndarray, by_pixels: bool = False) -> Region | None:
    """The artifact region of the dataset rows ``members`` (one or more clusters), against the rest of their classes;
    ``store`` is the audit's :class:`~unhans.audit.store.StoredRelevance`, ``images``/``labels`` the audited dataset.
    ``by_pixels``: grown by the pixels the members share (:func:`grown_by_pixels`; for a transformer's token grid).
    None when the members carry no relevance the rest lacks."""
    members = np.unique(members)
    chosen = np.zeros(len(labels), bool)
    chosen[members] = True
    rest = np.flatnonzero(np.isin(labels, np.unique(labels[members])) & ~chosen)
    if rest.size == 0:
        rest = np.flatnonzero(~chosen)
    cluster_map, counted = mean_map(store, members)
    rest_map, _ = mean_map(store, rest) if rest.size else (None, 0)
    if cluster_map is None:
        return None
    contrast = cluster_map if rest_map is None else cluster_map - rest_map
    mask = region_mask(contrast)
    if not mask.any():
        return None
    grow = by_pixels and rest.size and spread(contrast) <= MAX_SPREAD  # an artifact everywhere has no pixels of one place
    if grow:
        mask = grown_by_pixels(mask, images[members], images[rest])
    region = cut_region(images[members], mask)
    region.grown = bool(grow)
    region.members = counted
    region.share = float(cluster_map[mask].sum())
    region.rest_share = float(rest_map[mask].sum()) if rest_map is not None else float("nan")
    region.spread = spread(contrast)
    area = mask.mean()
    if region.everywhere:
        region.warnings.append(f"half of what sets the cluster's relevance apart from the rest of its class lies on {region.spread:.0%} of "
                               f"the image (an artifact with a place: a few percent, at most {MAX_SPREAD:.0%}): the artifact is spread "
                               "over the image (a texture, a colour cast, a border on every side, noise), so no region of it is the artifact")
    elif area > MAX_AREA:
        region.warnings.append(f"the region covers {area:.0%} of the image: the cluster's relevance has no localised peak "
                               "(an artifact at a different place in every image?); a paired set from it may not isolate the artifact")
    if region.share < MIN_SHARE:
        region.warnings.append(f"the region holds only {region.share:.0%} of the cluster's relevance")
    if region.moves:
        region.warnings.append(f"the rest of the class puts {region.rest_share:.0%} of its relevance in the region, the cluster "
                               f"{region.share:.0%}: the region is where the class's object lies, so the artifact has no place of "
                               "its own (a different place in every image)")
    return region


def clean_rows(labels: np.ndarray, members: np.ndarray, limit: int = CLEAN_IMAGES) -> np.ndarray:
    """Up to ``limit`` rows spread evenly over the dataset, from classes the members are not in (else any row not a
    member): the clean images to paste the region into."""
    chosen = np.zeros(len(labels), bool)
    chosen[members] = True
    pool = np.flatnonzero(~np.isin(labels, np.unique(labels[members])))
    if pool.size == 0:
        pool = np.flatnonzero(~chosen)
    return pool[np.unique(np.linspace(0, pool.size - 1, min(limit, pool.size)).round().astype(int))] if pool.size else pool


def write_region(out: str | Path, region: Region, images: np.ndarray, clean: np.ndarray, selection: dict) -> dict[str, Path]:
    """OUT/artifact-region.png (RGBA), OUT/artifact-region.json (position, figures, rule) and OUT/region-clean/
    (PNG images without the artifact, for ``unhans export --images``); returns the three paths."""
    from PIL import Image

    out = Path(out)
    png = region.save(out / REGION_IMAGE)
    folder = out / REGION_CLEAN
    if folder.is_dir():
        for old in folder.glob("*.png"):
            old.unlink()
    folder.mkdir(exist_ok=True)
    for row in clean:
        pixels = np.round(np.clip(images[row], 0, 1) * 255).astype(np.uint8)
        Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels[:3].transpose(1, 2, 0)).save(folder / f"row-{row:06d}.png")
    info = out / REGION_INFO
    info.write_text(json.dumps({**region.describe(), **selection, "image": png.name, "clean_images": folder.name}, indent=1))
    return {"image": png, "info": info, "clean": folder}


@dataclass
class SelectionInputs:
    """What ``unhans audit --select`` reads once for the region, the pattern and the commands it prints: the audit's
    spec, its dataset (row for row as samples.npz counts it), the stored relevance and the images as [0, 1] pixels."""

    audited: AuditSpec
    dataset: object  # core.data.ImageDataset
    store: object  # audit.store.StoredRelevance
    pixels: np.ndarray
    token_grid: bool = False  # the model is a transformer (a patch embedding): its region is grown by pixels (find_region)


def selection_inputs(out: str | Path, audit: dict, console) -> SelectionInputs | None:
    """The audit's inputs for a selection, or None (a line on ``console`` says why) when the stored relevance or the
    data no longer match the audit."""
    from unhans.core.errors import InputError

    from .store import StoredRelevance

    try:
        audited, dataset = audited_dataset(out, audit)
        store = StoredRelevance(Path(out) / "relevance")
    except InputError as error:
        console.print(f"[yellow]no artifact region written[/]: {error}")
        return None
    if store.n != len(dataset):
        console.print(f"[yellow]no artifact region written[/]: {Path(out) / 'relevance'} holds {store.n} rows, the audited data {len(dataset)}; "
                      "run the audit again with --restart")
        return None
    import torch

    from unhans.core.layers import patch_embedding_layer
    from unhans.core.models import load_model

    token_grid = patch_embedding_layer(load_model(audited.model_file, audited.weights), torch.from_numpy(dataset.images[:2])) is not None
    # the region, the pattern and the clean images are pictures: export reads them as photos
    return SelectionInputs(audited, dataset, store, audited.pictures(dataset.images), token_grid)


def write_selection_region(out: str | Path, audit: dict, inputs: SelectionInputs, rows: np.ndarray, selection: dict, console) -> dict[str, Path] | None:
    """For ``unhans audit --select``: the selected rows' artifact region written beside OUT/samples.npz (see
    :func:`write_region`), and the commands that correct the model printed on ``console`` and kept in the region's
    JSON (``route``: ``paired``, the export that pastes the region into clean images; ``samples``, for an artifact
    that moves, the correction from the selected rows, after the global pooling or by A-ClArC; ``commands``), with
    ``selection``: how the rows were chosen."""
    import torch

    from unhans.core.layers import global_pooling_layer, patch_embedding_layer
    from unhans.core.models import load_model
    from unhans.core.run_folder import DATASET_FILE, MODEL_FILE, WEIGHTS_FILE

    from .samples import SAMPLES_FILE

    out, spec = Path(out), audit.get("spec", {})
    audited, dataset, store, pixels = inputs.audited, inputs.dataset, inputs.store, inputs.pixels
    region = find_region(store, pixels, dataset.labels, rows, inputs.token_grid)
    if region is None:
        console.print("[yellow]no artifact region written[/]: the selected rows carry no relevance the rest of their class lacks")
        return None
    for warning in region.warnings:
        console.print(f"[yellow]artifact region: {warning}[/]")
    channels, height, width = dataset.image_shape
    contract = audited.input_contract()  # the clean images are already the model's size: no --resize again
    normalisation = "" if contract is None else f" --mean {','.join(map(str, contract.mean))} --std {','.join(map(str, contract.std))}"
    model_dir = Path(spec.get("model_file", "")).parent
    if all((model_dir / name).is_file() for name in (MODEL_FILE, WEIGHTS_FILE, DATASET_FILE)) and Path(spec.get("weights", "")).parent == model_dir:
        model = f"--run {shlex.quote(str(model_dir))}"  # a run's model: export measures the cost on the run's clean test set
    else:
        model = f"--model {shlex.quote(str(spec.get('model_file')))} --weights {shlex.quote(str(spec.get('weights')))}"
    # the layer the audit analysed (its latent layer by default) is a good first place for the correction; in a
    # transformer, the patch embedding (core.layers.patch_embedding_layer: after it attention spreads the artifact)
    analysed = audit.get("analysed_layer", spec.get("layer"))
    embedding = patch_embedding_layer(load_model(audited.model_file, audited.weights), torch.from_numpy(dataset.images[:2]))
    analysed = embedding or analysed
    layer = shlex.quote(analysed) if analysed and analysed not in (INPUT, "auto") else "LAYER"
    samples = shlex.quote(str(out / SAMPLES_FILE))
    if region.everywhere:  # no place, so no region: the selected rows themselves are the contrast set, at a layer that keeps positions
        written = {"info": out / REGION_INFO}
        written["info"].write_text(json.dumps({**region.describe(), **selection, "image": None, "clean_images": None}, indent=1))
        for stale in (out / REGION_IMAGE, *(out / REGION_CLEAN).glob("*.png")):
            stale.unlink(missing_ok=True)
        lead = ("the artifact is spread over the image (see above), so no region of it is written: a piece pasted into clean images "
                "is not the artifact. Fit the correction from the selected samples themselves at the layer the audit analysed, "
                "where the artifact lies at the same place in every image:")
        commands = [f"unhans export {model} --layer {layer} --samples {samples} --out corrected.onnx"]
        if model.startswith("--run"):
            lead += (" (if the export refuses it for removing too little of the artifact's effect, fine-tune instead: "
                     f"unhans aclarc {model} --samples {samples} --out {shlex.quote(f'{model_dir}-aclarc')})")
        route = "samples"
        console.print("\n  ".join([lead, *commands]), soft_wrap=True, markup=False, highlight=False)
        info = json.loads(written["info"].read_text())
        written["info"].write_text(json.dumps({**info, "route": route, "commands": commands}, indent=1))
        return written
    clean = clean_rows(dataset.labels, rows)
    written = write_region(out, region, pixels, clean, selection)
    row, col, h, w = region.box
    console.print(f"artifact region ({h}x{w} px at {row},{col}; {region.share:.0%} of the cluster's relevance, "
                  f"{region.rest_share:.0%} of the rest of its class's) written to {written['image']} (position and figures in "
                  f"{written['info'].name}), with {len(clean)} clean images to paste it into in {written['clean']}", markup=False, highlight=False)
    if region.moves:  # no one place to paste: the selected rows themselves are the contrast set
        pooling = global_pooling_layer(load_model(audited.model_file, audited.weights), torch.from_numpy(dataset.images[:2]))
        lead = "the artifact has no one place (see above), so a paired set pasted from a region would not be it; "
        if pooling:
            lead += (f"fit the correction from the selected samples instead, after the model's global pooling ({pooling}), where an "
                     "artifact that moves lands in the same features wherever it sits:")
            commands = [f"unhans export {model} --layer {shlex.quote(pooling)} --samples {samples} --out corrected.onnx"]
        elif model.startswith("--run"):
            tuned = shlex.quote(f"{model_dir}-aclarc")
            lead += ("and this model has no global pooling layer, so no projection removes an artifact that moves (README: which "
                     "layer to correct). Fine-tune it with each selected sample's own region pasted into other images (A-ClArC), "
                     "then export that run with a reactive correction, which leaves clean inputs alone and keeps the artifact "
                     "score the monitor watches:")
            commands = [f"unhans aclarc {model} --samples {samples} --out {tuned}",
                        f"unhans export --run {tuned} --layer {layer} --samples {samples} --reactive --out corrected.onnx"]
        else:
            lead += ("and this model has no global pooling layer: no projection measured removed an artifact that moves, and "
                     "A-ClArC (unhans aclarc) fine-tunes training runs only. The correction from the selected samples is the "
                     "nearest; check the corrected model's predictions on images with the artifact before deploying it:")
            commands = [f"unhans export {model} --layer {layer} --samples {samples} --out corrected.onnx"]
        route = "samples"
    else:
        lead = (("check the region first (see above); if it is the artifact, " if region.warnings else "") + "fit the paired correction with"
                + (" (LAYER: the module whose output is corrected, e.g. features.pool2)" if layer == "LAYER"
                   else " (--layer: the transformer's patch embedding, before attention spreads the artifact over every token)"
                   if embedding else " (--layer: the layer the audit analysed; any module whose output is corrected)") + ":")
        commands = [f"unhans export {model} --layer {layer} --images {shlex.quote(str(written['clean']))} "
                    f"--artifact-image {shlex.quote(str(written['image']))} --position {row},{col} --size {height},{width} "
                    f"--channels {channels}{normalisation} --samples {samples} --out corrected.onnx"]
        route = "paired"
    console.print("\n  ".join([lead, *commands]), soft_wrap=True, markup=False, highlight=False)
    info = json.loads(written["info"].read_text())
    written["info"].write_text(json.dumps({**info, "route": route, "commands": commands}, indent=1))
    return written
