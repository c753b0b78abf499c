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
from pathlib import Path

import numpy as np
from PIL import Image

from unhans.audit.clusters import concentration
from unhans.audit.report import embedding_plot, heatmap_overlay, prototypes, save_strip

from .detector import EVIDENCE, ClassDrift

LATEST = "latest"


def class_slug(name: str) -> str:
    """A class name as it may appear in a file name and a URL."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def window_folder(index: int) -> str:
    return f"window-{index:06d}"


def _picture(thumbnail: np.ndarray | None, relevance: np.ndarray) -> Image.Image:
    """A served input's thumbnail, scaled to its relevance map, with the map laid over it."""
    height, width = relevance.shape
    if thumbnail is None:
        image = np.zeros((1, height, width), np.float32)
    else:
        small = Image.fromarray(thumbnail[..., 0] if thumbnail.shape[-1] == 1 else thumbnail)
        image = np.asarray(small.resize((width, height), Image.BILINEAR), np.float32) / 255.0
        image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    return heatmap_overlay(image, relevance[None])


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
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right; }}
figure {{ margin: 0.6em 0; }} figcaption {{ font-size: 0.85em; color: #555; }}
section {{ border-top: 2px solid #eee; margin-top: 1.5em; }}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>These classes are explained differently in served traffic than on the trusted reference: a new group of
explanations appeared. A cluster whose heatmaps sit on something other than the object (a corner, a tag, a border)
is a new Clever-Hans strategy.</p>
{''.join(sections)}
</body></html>
"""
    page_path = folder / "index.html"
    _atomic_text(page_path, page)
    latest = root / LATEST
    latest.mkdir(exist_ok=True)
    for drift in alerting:
        slug = class_slug(classes[drift.class_index])
        target = f"../{window_folder(index)}/index.html#class-{slug}"
        _atomic_text(latest / f"class-{slug}.html", f"<!doctype html><meta http-equiv='refresh' content='0; url={target}'>"
                                                     f"<a href='{target}'>newest evidence for class {html.escape(classes[drift.class_index])}</a>\n")
    return page_path
