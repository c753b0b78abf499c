"""The audit report: one self-contained HTML page plus its PNG images, readable in any browser.

It shows the classes ranked by Clever-Hans suspicion and, per class, the eigenvalue spectrum (a gap after the
first few eigenvalues means separate strategies), a 2-D embedding coloured by cluster, and prototype heatmaps of
each cluster overlaid on their images (zennit's ``coldnhot`` colour map: red for evidence for the class).
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from zennit.image import imgify  # noqa: E402

from .clusters import ARTIFACT_BAR, ARTIFACT_MARGIN, OTHER_CLASS_RATIO, REGION_MASS, marked_figure, summary  # noqa: E402

PROTOTYPES_PER_CLUSTER = 6
THUMBNAIL_SIDE = 112  # pixels a heatmap is enlarged towards (at most 4x)
CLUSTER_COLOURS = plt.get_cmap("tab10")


def heatmap_overlay(image: np.ndarray, relevance: np.ndarray, scale: int = 4) -> Image.Image:
    """An image (C, H, W) in [0, 1] with its relevance (C, H, W) laid over it, enlarged ``scale`` times."""
    grey = image.mean(axis=0)
    heat = np.asarray(imgify(relevance.sum(axis=0), symmetric=True, cmap="coldnhot").convert("RGB"), np.float32) / 255
    weight = np.clip(np.abs(relevance.sum(axis=0)) / (np.abs(relevance.sum(axis=0)).max() + 1e-12), 0, 1)[..., None]
    blended = (1 - 0.75 * weight) * grey[..., None] + 0.75 * weight * heat
    picture = Image.fromarray((blended * 255).astype(np.uint8), "RGB")
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def prototypes(embedding: np.ndarray, labels: np.ndarray, cluster: int, count: int = PROTOTYPES_PER_CLUSTER) -> np.ndarray:
    """Positions (within the class) of the members closest to their cluster's centre in the spectral embedding."""
    members = np.flatnonzero(labels == cluster)
    centre = embedding[members].mean(axis=0)
    order = np.argsort(np.linalg.norm(embedding[members] - centre, axis=1))
    return members[order[:count]]


def transplant_picture(image: np.ndarray, turned: bool, scale: int = 4) -> Image.Image:
    """An image (C, H, W) in [0, 1] after a transplant, framed red when its prediction turned into the class."""
    pixels = np.clip(image if image.shape[0] == 3 else np.repeat(image.mean(axis=0, keepdims=True), 3, axis=0), 0, 1)
    picture = Image.fromarray((pixels.transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    framed = Image.new("RGB", (picture.width + 6, picture.height + 6), (214, 39, 40) if turned else (200, 200, 200))
    framed.paste(picture, (3, 3))
    return framed


def save_strip(path: Path, pictures: list[Image.Image]) -> None:
    gap = 4
    strip = Image.new("RGB", (sum(p.width for p in pictures) + gap * (len(pictures) - 1), max(p.height for p in pictures)), "white")
    x = 0
    for picture in pictures:
        strip.paste(picture, (x, 0))
        x += picture.width + gap
    strip.save(path)


def spectrum_plot(path: Path, eigenvalues: np.ndarray, n_clusters: int) -> None:
    fig, ax = plt.subplots(figsize=(3.6, 2.4), dpi=100)
    ax.plot(np.arange(1, len(eigenvalues) + 1), eigenvalues, "o-", markersize=3)
    ax.axvline(n_clusters + 0.5, color="tab:red", linestyle="--", linewidth=1, label=f"gap: {n_clusters} clusters")
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue of L")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def embedding_plot(path: Path, embedding: np.ndarray, labels: np.ndarray, title: str) -> None:
    fig, ax = plt.subplots(figsize=(3.6, 3.0), dpi=100)
    for cluster in np.unique(labels):
        points = embedding[labels == cluster]
        ax.scatter(points[:, 0], points[:, 1], s=6, color=CLUSTER_COLOURS(int(cluster) % 10), label=f"cluster {cluster} ({len(points)})")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out_dir: str | Path, title: str, ranked: list, classes: list[str], images: np.ndarray, relevance: np.ndarray,
                 evidence: dict, notes: list[str] = (), pictures=lambda x: x) -> Path:
    """Write ``report.html`` and ``report/*.png`` for the ``ranked`` :class:`~unhans.core.spray.ClassResult` list, with
    each class's :class:`~unhans.audit.clusters.ClusterEvidence` list in ``evidence`` (by class index). ``images``
    are the model's inputs; ``pictures`` turns them into the [0, 1] pixels drawn (undoing a normalisation)."""
    out = Path(out_dir)
    assets = out / "report"
    assets.mkdir(parents=True, exist_ok=True)
    rows, sections = [], []
    scale = max(1, min(4, THUMBNAIL_SIDE // images.shape[-2]))  # small digits enlarged, 224-px photos as they are
    for finding in ranked:
        name = html.escape(classes[finding.class_index])
        if finding.spray is None:
            rows.append(f"<tr class='skipped'><td>–</td><td>{name}</td><td>{finding.n_samples}</td><td colspan='7'>skipped: {html.escape(finding.skipped)}</td></tr>")
            continue
        spray = finding.spray
        sizes = np.bincount(spray.labels_).tolist()
        found = evidence[finding.class_index]
        entry = summary(found)  # the verdict and marked clusters, as audit.json keeps them
        marked, said = entry["artifact_clusters"], entry["artifact_verdict"]
        rows.append(
            f"<tr><td>{finding.rank}</td><td><a href='#class-{finding.class_index}'>{name}</a></td><td>{finding.n_samples}</td>"
            f"<td>{finding.suspicion:.3f}</td><td>{spray.lambda2_:.4f}</td><td>{spray.fisher_tau_:.2f}</td>"
            f"<td>{spray.eigengap_:.4f}</td><td>{spray.n_clusters_}</td><td>{sizes}</td>"
            f"<td>{', '.join(marked_figure(entry, c) for c in marked) or 'none found'}</td></tr>"
        )
        stem = f"class-{finding.class_index}"
        spectrum_plot(assets / f"{stem}-spectrum.png", spray.eigenvalues_, spray.n_clusters_)
        embedding = spray.embedding_2d_ if spray.embedding_2d_ is not None else spray.eigenvectors_[:, 1:3]
        embedding_plot(assets / f"{stem}-embedding.png", embedding, spray.labels_,
                        "t-SNE of the spectral embedding" if spray.embedding_2d_ is not None else "eigenvectors 2 and 3")
        clusters = []
        for cluster in range(spray.n_clusters_):
            chosen = finding.indices[prototypes(spray.eigenvectors_[:, : spray.n_clusters_], spray.labels_, cluster)]
            members = finding.indices[spray.labels_ == cluster]
            mean_map = relevance[members].mean(axis=0)
            strip = [heatmap_overlay(pictures(images[members].mean(axis=0)), mean_map, scale)]
            strip += [heatmap_overlay(pictures(images[i]), relevance[i], scale) for i in chosen]
            save_strip(assets / f"{stem}-cluster-{cluster}.png", strip)
            tested = found[cluster]
            if tested.examples is not None and len(tested.examples):
                save_strip(assets / f"{stem}-cluster-{cluster}-transplants.png",
                           [transplant_picture(pictures(x), turned, scale) for x, turned in zip(tested.examples, tested.examples_turned)])
            clusters.append(
                f"<figure><img src='report/{stem}-cluster-{cluster}.png' alt='prototypes of cluster {cluster}'>"
                f"<figcaption>cluster {cluster}: {len(members)} samples; transplant rate {found[cluster].transplant_rate:.0%} "
                f"(regions of {found[cluster].region_share:.0%} of the pixels, {found[cluster].donors} donors); "
                f"the model gives its members' most likely other class {found[cluster].other_class:.0%} on average"
                + ("" if found[cluster].small_rate is None else f"; regions cut to the smallest carrying size turn {found[cluster].small_rate:.0%}")
                + f"{' <b>(the artifact)</b>' if cluster in marked else ''}"
                f" — mean heatmap, then prototypes (rows {chosen.tolist()})</figcaption></figure>"
                + (f"<figure><img src='report/{stem}-cluster-{cluster}-transplants.png' alt='transplants of cluster {cluster}'>"
                   f"<figcaption>images of other classes with a member's most relevant pixels pasted in: red border = now predicted {name}"
                   "</figcaption></figure>" if tested.examples is not None and len(tested.examples) else "")
            )
        sections.append(
            f"<section id='{stem}'><h2>#{finding.rank} class {name}</h2>"
            f"<p>{finding.n_samples} samples, {spray.n_clusters_} clusters, λ₂ = {spray.lambda2_:.4f}, τ = {spray.fisher_tau_:.2f}. "
            f"<b>{html.escape(said)}</b>.</p>"
            f"<div class='plots'><img src='report/{stem}-spectrum.png' alt='eigenvalue spectrum'>"
            f"<img src='report/{stem}-embedding.png' alt='embedding'></div>{''.join(clusters)}</section>"
        )
    note_items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }}
th:nth-child(2), td:nth-child(2) {{ text-align: left; }} tr.skipped {{ color: #999; }}
tbody tr:first-child {{ background: #fff3e0; }} .plots img {{ margin-right: 1em; }} figure {{ margin: 0.6em 0; }}
figcaption {{ font-size: 0.85em; color: #555; }} section {{ border-top: 2px solid #eee; margin-top: 1.5em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Classes ranked by Clever-Hans suspicion: a class whose explanations fall apart into well-separated groups
(small λ₂, large Fisher separability τ) may be solved with more than one strategy, one of them spurious.
Look at the prototype heatmaps of each cluster: a cluster whose relevance sits on something other than the object is
the artifact. The audit tests each cluster: it pastes each sampled member's most relevant pixels (those holding
{REGION_MASS:.0%} of its positive relevance) into images of other classes, and marks a cluster as the artifact when at
least {ARTIFACT_BAR:.0%} of them then turn into the class (its transplant rate), {ARTIFACT_MARGIN:.0%} more than the rest of
the class. Where another cluster's regions nearly carry the class too, the transplant cannot decide; a cluster whose
members' images also show another class (the model's probability for it at least {OTHER_CLASS_RATIO:g} times the rest's),
as a backdoor's samples do, is then the artifact. Classes with a marked cluster rank first, then classes whose carrying
clusters do not stand out from the rest (hijackable).</p>
<ul>{note_items}</ul>
<h2>Ranking</h2>
<table id="ranking"><thead><tr><th>rank</th><th>class</th><th>samples</th><th>suspicion</th><th>λ₂</th><th>τ</th>
<th>eigengap</th><th>clusters</th><th>cluster sizes</th><th>artifact (its evidence)</th></tr></thead><tbody>{''.join(rows)}</tbody></table>
{''.join(sections)}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
