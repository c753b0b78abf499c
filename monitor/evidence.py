"""What an operator sees when an alert fires: per alerting class, what the model now looks at.

For each alerting window, ``<evidence>/window-<index>/index.html`` shows, per class, the evidence against its
calibration, the spectral embedding coloured by cluster, and per cluster the mean heatmap and prototype heatmaps
over the served inputs' thumbnails, beside the reference's mean heatmap. ``<evidence>/latest/class-<name>.html``
always leads to the newest page of a class: it is the stable link the alert's annotation carries.
"""

from __future__ import annotations

import html
import os
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image

from unhans.audit.clusters import concentration
from unhans.audit.report import embedding_plot, heatmap_overlay, prototypes, save_strip

from .detector import EVIDENCE, ClassDrift

LATEST = "latest"
PICTURE_SIDE = 112  # pictures on a page are enlarged to about this many pixels high (never shrunk)
PROTOTYPES_SHOWN = 8  # served samples shown for a cross-class alert (a row of 8 at 112 px fits a page)


def class_slug(name: str) -> str:
    """A class name as it may appear in a file name and a URL."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def window_folder(index: int) -> str:
    return f"window-{index:06d}"


def _scale(height: int) -> int:
    """How many times a picture of ``height`` pixels is enlarged on a page: small inputs grow, photos stay near 112-224 px."""
    return max(1, PICTURE_SIDE // height)


def _picture(thumbnail: np.ndarray | None, relevance: np.ndarray) -> Image.Image:
    """A served input's thumbnail, scaled to its relevance map, with the map laid over it."""
    height, width = relevance.shape
    if thumbnail is None:
        image = np.zeros((1, height, width), np.float32)
    else:
        small = Image.fromarray(thumbnail[..., 0] if thumbnail.shape[-1] == 1 else thumbnail)
        image = np.asarray(small.resize((width, height), Image.BILINEAR), np.float32) / 255.0
        image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    return heatmap_overlay(image, relevance[None], scale=_scale(height))


def _photo(thumbnail: np.ndarray | None, shape: tuple[int, int]) -> Image.Image:
    """A served input's thumbnail in its own colours, at the size its heatmap is shown."""
    height, width = shape
    side = (width * _scale(height), height * _scale(height))
    if thumbnail is None:
        return Image.new("RGB", side, "grey")
    return Image.fromarray(thumbnail[..., 0] if thumbnail.shape[-1] == 1 else thumbnail).convert("RGB").resize(side, Image.BILINEAR)


def _atomic_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_evidence(root: str | Path, index: int, title: str, classes: list[str], alerting: list[ClassDrift],
                   relevance: np.ndarray, thumbnails: list, request_ids: list[str], reference_means: dict[int, np.ndarray]) -> Path:
    """Write the evidence page of window ``index`` for its ``alerting`` classes; returns the page's path.

    ``relevance`` (n, H, W) and ``thumbnails`` are the window's records, ``reference_means`` the reference's mean raw
    map per class. Rewriting the same window (after a restart) replaces its files.
    """
    root = Path(root)
    folder = root / window_folder(index)
    folder.mkdir(parents=True, exist_ok=True)
    sections = []
    for drift in alerting:
        name, slug = classes[drift.class_index], class_slug(classes[drift.class_index])
        spray, rows = drift.spray, drift.analysed
        embedding_plot(folder / f"class-{slug}-embedding.png", spray.eigenvectors_[:, 1:3], spray.labels_, "eigenvectors 2 and 3")
        reference = reference_means.get(drift.class_index)
        figures = []
        if reference is not None:
            save_strip(folder / f"class-{slug}-reference.png", [_picture(None, reference)])
            figures.append(f"<figure><img src='class-{slug}-reference.png' alt='reference mean heatmap'>"
                           "<figcaption>reference: mean heatmap of trusted samples of this class</figcaption></figure>")
        concentrations = [concentration(relevance[rows[spray.labels_ == c]][:, None]) for c in range(spray.n_clusters_)]
        for cluster in np.argsort(concentrations)[::-1]:  # the likely new strategy first
            members = rows[spray.labels_ == cluster]
            chosen = rows[prototypes(spray.eigenvectors_[:, :spray.n_clusters_], spray.labels_, cluster)]
            pictures = [_picture(None, relevance[members].mean(axis=0))] + [_picture(thumbnails[i], relevance[i]) for i in chosen]
            save_strip(folder / f"class-{slug}-cluster-{cluster}.png", pictures)
            ids = ", ".join(html.escape(request_ids[i]) for i in chosen)
            figures.append(f"<figure><img src='class-{slug}-cluster-{cluster}.png' alt='cluster {cluster} of class {html.escape(name)}'>"
                           f"<figcaption>cluster {cluster}: {len(members)} of {len(rows)} samples, {concentrations[cluster]:.0%} of the mean "
                           f"relevance on 2% of the pixels{' <b>(most concentrated: the likely new strategy)</b>' if cluster == np.argmax(concentrations) else ''}"
                           " — mean heatmap, then prototypes "
                           f"(requests {ids})</figcaption></figure>")
        evidence_rows = "".join(f"<tr><td>{k}</td><td>{drift.statistics[k]:.4g}</td><td>{drift.z[k]:.1f}</td></tr>" for k in EVIDENCE)
        share = "" if drift.artifact_share is None else f", artifact detector flags {drift.artifact_share:.1%}"
        sections.append(
            f"<section id='class-{slug}'><h2>class {html.escape(name)}</h2>"
            f"<p>{drift.n} samples in the window ({len(rows)} analysed){share}. Drift score {drift.drift_score:.1f} "
            f"(largest z-score) above the calibrated threshold {drift.threshold:.1f}.</p>"
            f"<table><thead><tr><th>evidence</th><th>value</th><th>z</th></tr></thead><tbody>{evidence_rows}</tbody></table>"
            f"<img src='class-{slug}-embedding.png' alt='spectral embedding'>{''.join(figures)}</section>")
    return _write_page(root, folder, index, title, sections, [classes[d.class_index] for d in alerting],
                       "These classes are explained differently in served traffic than on the trusted reference: a new group of "
                       "explanations appeared. A cluster whose heatmaps sit on something other than the object (a corner, a tag, "
                       "a border) is a new Clever-Hans strategy.")


def _write_page(root: Path, folder: Path, index: int, title: str, sections: list[str], labels: list[str], intro: str) -> Path:
    """The window's page, and ``latest/class-<label>.html`` leading to it for each alerting label (the alert's link)."""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right; }}
figure {{ margin: 0.6em 0; }} img {{ max-width: 100%; height: auto; }} figcaption {{ font-size: 0.85em; color: #555; }}
section {{ border-top: 2px solid #eee; margin-top: 1.5em; }}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(intro)}</p>
{''.join(sections)}
</body></html>
"""
    page_path = folder / "index.html"
    if page_path.is_file():  # the window's page already holds sections (per class, then across classes): add the new ones
        existing = page_path.read_text(encoding="utf-8")
        new = [section for section in sections if section[:section.index(">") + 1] not in existing]
        if "</body></html>" in existing:
            page = existing.replace("</body></html>", "".join(new) + "\n</body></html>")
    _atomic_text(page_path, page)
    latest = root / LATEST
    latest.mkdir(exist_ok=True)
    for label in labels:
        slug = class_slug(label)
        target = f"../{window_folder(index)}/index.html#class-{slug}"
        _atomic_text(latest / f"class-{slug}.html", f"<!doctype html><meta http-equiv='refresh' content='0; url={target}'>"
                                                     f"<a href='{target}'>newest evidence for class {html.escape(label)}</a>\n")
    return page_path

def write_crossclass_evidence(root: str | Path, index: int, title: str, label: str, classes: list[str], drift, relevance: np.ndarray,
                              thumbnails: list, request_ids: list[str], predictions: np.ndarray, since: int, first_timestamp: float) -> Path:
    """Write the evidence page of window ``index``'s cross-class alert (``drift``: a
    :class:`~unhans.monitor.crossclass.CrossClassDrift`) and point ``latest/class-<label>.html`` at it.

    What a person needs to act: where on the served photos the model now looks (the samples that carry the drift,
    their photos and heatmaps), which classes they were predicted as against the window as a whole, and since when."""
    from collections import Counter

    from .crossclass import EVIDENCE as CROSS_EVIDENCE

    root = Path(root)
    folder = root / window_folder(index)
    folder.mkdir(parents=True, exist_ok=True)
    slug = class_slug(label)
    group = max(PROTOTYPES_SHOWN, len(drift.rows) // 20)  # the leading 5% of the tested samples
    leading = drift.leading(group)
    labels = np.zeros(len(drift.rows), int)
    labels[leading] = 1
    embedding_plot(folder / f"class-{slug}-embedding.png", np.column_stack([drift.contributions, drift.distances]), labels,
                   "shift contribution (x) vs distance to the reference (y)")
    shown = drift.rows[leading[:PROTOTYPES_SHOWN]]
    save_strip(folder / f"class-{slug}-photos.png", [_photo(thumbnails[i], relevance.shape[1:]) for i in shown])
    save_strip(folder / f"class-{slug}-heatmaps.png", [_picture(thumbnails[i], relevance[i]) for i in shown])
    in_group = Counter(classes[int(predictions[i])] for i in drift.rows[leading])
    overall = Counter(classes[int(predictions[i])] for i in drift.rows)
    class_rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{count}</td><td>{count / len(leading):.0%}</td>"
                         f"<td>{overall[name] / len(drift.rows):.1%}</td></tr>" for name, count in in_group.most_common(12))
    evidence_rows = "".join(f"<tr><td>{k}</td><td>{drift.statistics[k]:.4g}</td><td>{drift.z[k]:.1f}</td></tr>" for k in CROSS_EVIDENCE)
    ids = ", ".join(html.escape(request_ids[i]) for i in shown)
    section = (
        f"<section id='class-{slug}'><h2>all classes: a new strategy across classes</h2>"
        f"<p>{len(drift.rows)} samples tested (relevance per channel at the monitor layer; samples the known artifact's "
        f"detector flags are left out). Drift score {drift.drift_score:.1f} (largest z-score) above the calibrated threshold "
        f"{drift.threshold:.1f}; alerting since window {since} (this window's first record: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(first_timestamp))}).</p>"
        f"<table><thead><tr><th>evidence</th><th>value</th><th>z</th></tr></thead><tbody>{evidence_rows}</tbody></table>"
        f"<h3>the served photos that carry the drift, and where the model looks on them</h3>"
        f"<figure><img src='class-{slug}-photos.png' alt='served photos'><figcaption>served photos (requests {ids})</figcaption></figure>"
        f"<figure><img src='class-{slug}-heatmaps.png' alt='their heatmaps'><figcaption>their relevance for the predicted class "
        f"(red: for it), over the photo</figcaption></figure>"
        f"<h3>predicted as</h3><table><thead><tr><th>class</th><th>samples of the {len(leading)} leading</th><th>share of them</th>"
        f"<th>share of the window</th></tr></thead><tbody>{class_rows}</tbody></table>"
        f"<img src='class-{slug}-embedding.png' alt='the window: each sample by its share in the drift'></section>")
    return _write_page(root, folder, index, title, [section], [label],
                       "The window's explanations, all classes together, moved away from the trusted reference: the relevance "
                       "per channel shifted in one direction, which the samples below carry most. If their heatmaps sit on "
                       "something other than the object (a watermark, a tag, a border), the model found a new Clever-Hans strategy.")
