"""Which cluster of a class is an artifact: the one whose most relevant pixels, pasted into other images, carry the class.

SpRAy finds that a class is solved by separate strategies; it cannot say which one is spurious. The evidence here is
an intervention: an artifact is a small thing that suffices by itself, an object is not. For sampled members
(donors) of each cluster, the donor's *region* (the fewest pixels holding ``REGION_MASS`` of its positive
relevance, the same pixels in every channel) is pasted into images of other classes that the model does not assign
to this class; the cluster's **transplant rate** is the share of those images whose prediction turns to the class.

Measured on MNIST-5k (VGG-style model): a 2-px border frame backdoor to 7 gave 0.92 for the poisoned cluster and
0.10 for the clean 7s (the most *concentrated* cluster, the rule before this, was the clean one); clean classes'
clusters 0.01-0.10. A fixed share of pixels instead of a share of relevance failed on the frame (0.14 at 2% of the
pixels): an artifact's size is unknown, its share of the relevance is not. Per donor the rate separates poisoned
from clean 7s with an AUC of 0.9998.

A cluster is marked only when its rate reaches ``ARTIFACT_BAR`` and the marked ones beat the rest of their class by ``ARTIFACT_MARGIN``;
a class without one has no artifact found, and the audit says so rather than marking a cluster anyway. Where the
artifact looks like the class's own evidence, the transplant cannot decide: a "©" at random positions, backdoor to 0,
taught the model that a small ring anywhere is a 0, and the clean 0s' ring fragments carried the class better than
the tags did. Such a class is *contested* (a second cluster reaches ``CONTESTED_BAR``), and there a second piece of
evidence decides: a backdoor's samples are other classes' images, and the model still sees their class, so the
clusters whose members give another class ``OTHER_CLASS_RATIO`` times the probability the rest's do are the artifact
(``_holding_other_classes``). Where that finds nothing, a third does: the transplant again with regions of equal
size in every cluster, as many pixels as the smallest carrying cluster's (``_sufficient_when_small``). An artifact is
small and suffices; an object that can also be pasted needs more of itself. On SmallResNet (global average
pooling) with the same tag, the model was sure of the tagged images, so no other class showed (0.03 against the
clean 0s' 0.06), and both clusters carried the class (0.96 and 0.86); at the tag regions' 7% of the pixels the
clean 0s' fragments turned only 0.62, the tags' 0.97. On the VGG's tag clusters it does not separate (0.90 against
0.80 at 10%; reversed at 2-5%): there the other-class test decides first.

A vision transformer's input relevance is a token grid (the flat rule spreads each patch embedding's relevance over
its patch), so a donor's region is whole tokens, object and artifact mixed, and an artifact spread over many tokens
is cut to some of them: on the small ViT (4-px patches) with a 2-px frame backdoor to 0 at 5%, SpRAy's frame cluster
was 180 tagged rows of 188, yet its regions turned 26% of other images (the clean 0s' 17%) and nothing was marked.
For such a model (``token_grid``), where no other test marks a cluster, a fourth does: each cluster's *shared pixels*
(where its members' median image differs from the rest of the class's by ``ARTIFACT_PIXEL`` of the largest difference,
and ``SURE`` of its members are nearer their own median there) are pasted into other classes' images
(``_sharing_pixels``). An artifact pasted at one place is the same in every member; a digit's strokes are not. The
frame cluster's shared pixels turned 100% of other images, the clean 0s' 3%; on the patch and "©" backdoors 99-100%
against 1-17%; no cluster of the 9 clean classes above 2%.

At low resolution the test cannot tell: on 8x8 digits half an object's relevance covers a quarter of the image and
clean clusters reached 0.5-0.72, so regions larger than ``MAX_REGION_SHARE`` of the image mark nothing (MNIST's 2-px
frame, the largest artifact measured, is 0.13; clean MNIST digits 0.06-0.10). A class whose carrying clusters do not
stand out from the rest is *hijackable* (its evidence can be pasted) but neither test isolates its artifact samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from unhans.core.artifacts import Transplant
from unhans.core.spray import ClassResult
from unhans.core.training import probabilities

REGION_MASS = 0.5  # a donor's region holds this share of its positive relevance
DONORS_PER_CLUSTER = 48  # sampled members per cluster whose regions are transplanted
RECIPIENTS_PER_DONOR = 4  # images of other classes each region is pasted into
ARTIFACT_BAR = 0.5  # a cluster whose regions turn at least this share of recipients is marked as an artifact ...
ARTIFACT_MARGIN = 0.25  # ... when such clusters beat the rest of their class by this much (else the class is hijackable)
MAX_REGION_SHARE = 0.2  # ... and its regions cover at most this share of the image (more is the object itself)
CONTESTED_BAR = 0.25  # a class where two clusters' regions turn this share is contested: the transplant cannot decide ...
OTHER_CLASS_RATIO = 3.0  # ... and the clusters whose members give another class this many times the rest's probability ...
MIN_OTHER_CLASS = 0.05  # ... and at least this much on average are the artifact (a backdoor: other classes' images)
EXAMPLES = 6  # transplanted images per cluster shown in the report
ARTIFACT_PIXEL = 0.5  # an artifact's own pixels differ from the rest of its class's by this share of the largest difference ...
SURE = 0.8  # ... and this share of its rows are nearer the artifact than the rest there (shared pixels, audit.pattern, audit.region)
MEDIAN_ROWS = 512  # most rows a median image is taken over


def median_image(images: np.ndarray, limit: int = MEDIAN_ROWS) -> np.ndarray:
    """The per-pixel median of up to ``limit`` of ``images`` (N, C, H, W), taken evenly through them."""
    pick = np.unique(np.linspace(0, len(images) - 1, min(limit, len(images))).round().astype(int))
    return np.median(images[pick], axis=0)


def shared_pixels(members: np.ndarray, rest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels (H, W) where the members' median image differs from the rest's by at least ``ARTIFACT_PIXEL`` of the
    largest difference and ``SURE`` of the members are nearer their own median there; and the members' median."""
    own, other = median_image(members), median_image(rest)
    difference = np.abs(own - other).max(axis=0)
    if difference.max() <= 0:
        return np.zeros(difference.shape, bool), own
    sample = members[np.unique(np.linspace(0, len(members) - 1, min(MEDIAN_ROWS, len(members))).round().astype(int))]
    nearer = (np.abs(sample - own).max(axis=1) < np.abs(sample - other).max(axis=1)).mean(axis=0)
    return (difference >= ARTIFACT_PIXEL * difference.max()) & (nearer >= SURE), own


def concentration(relevance: np.ndarray, top: float = 0.02) -> float:
    """Share of the absolute mean relevance (channels summed) that falls on the top ``top`` share of pixels.

    The monitor's statistic for a new strategy in unlabelled traffic, where no intervention can be run: an artifact is
    small and the same in every member of its cluster, so the cluster's mean map piles up on a few pixels.
    """
    magnitude = np.abs(relevance.reshape(len(relevance), -1, *relevance.shape[-2:]).sum(axis=1).mean(axis=0)).ravel()
    count = max(1, int(round(top * magnitude.size)))
    return float(np.sort(magnitude)[-count:].sum() / max(magnitude.sum(), 1e-12))


def top_pixels(relevance: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` pixels (H, W) of most positive relevance of one map (C, H, W) or (H, W)."""
    pixels = relevance.reshape(-1, *relevance.shape[-2:]).sum(axis=0)
    mask = np.zeros(pixels.size, bool)
    mask[np.argsort(np.clip(pixels.ravel(), 0, None))[::-1][:count]] = True
    return mask.reshape(pixels.shape)


def region(relevance: np.ndarray, mass: float = REGION_MASS) -> np.ndarray:
    """The fewest pixels (H, W) holding ``mass`` of the positive relevance of one map (C, H, W) or (H, W)."""
    ordered = np.sort(np.clip(relevance.reshape(-1, *relevance.shape[-2:]).sum(axis=0).ravel(), 0, None))[::-1]
    cumulative = np.cumsum(ordered)
    count = int(np.searchsorted(cumulative, mass * cumulative[-1])) + 1 if cumulative[-1] > 0 else 0
    return top_pixels(relevance, count)


@dataclass(eq=False)  # compared by identity: the rules pick clusters out of one class's list, and arrays have no ==
class ClusterEvidence:
    """One cluster's intervention test."""

    cluster: int
    size: int
    donors: int
    transplant_rate: float  # share of recipients whose prediction turned to the class
    region_share: float  # mean share of the image's pixels in a donor's region
    other_class: float  # mean over members of the model's probability for the most likely other class
    small_rate: float | None = None  # in a contested class: the transplant rate with regions as small as the smallest carrying ones
    examples: np.ndarray = field(default=None, repr=False)  # a few recipients after the transplant (N, C, H, W), for the report
    examples_turned: np.ndarray = field(default=None, repr=False)  # whether each example turned into the class
    shared_rate: float | None = None  # on a token grid: the share of other images its shared pixels turn into the class

    def figures(self) -> dict:
        return {"cluster": self.cluster, "size": self.size, "donors": self.donors, "transplant_rate": self.transplant_rate,
                "region_share": self.region_share, "other_class_probability": self.other_class,
                "small_region_transplant_rate": self.small_rate, "shared_pixels_transplant_rate": self.shared_rate}


class Intervention:
    """The transplant test of a model on a labelled image set with its input relevance (N, C, H, W).

    >>> evidence = Intervention(model, images, labels, relevance).of_class(result)   # one ClassResult of SpRAy
    """

    def __init__(self, model: nn.Module, images: np.ndarray, labels: np.ndarray, relevance: np.ndarray, seed: int = 0,
                 token_grid: bool = False):
        self.model = model.eval()
        self.images, self.labels, self.relevance = images, np.asarray(labels), relevance
        self.chances = probabilities(self.model, images)
        self.predictions = self.chances.argmax(1)
        self.seed = seed
        self.token_grid = token_grid  # a transformer's: the shared-pixels test too (module docstring)

    def shared_rate(self, members: np.ndarray, rest: np.ndarray, target: int) -> float:
        """The share of other classes' images (``DONORS_PER_CLUSTER`` x ``RECIPIENTS_PER_DONOR``, not predicted as
        ``target``) that turn into ``target`` with the members' shared pixels (:func:`shared_pixels`) pasted in."""
        pool = np.flatnonzero((self.labels != target) & (self.predictions != target))
        if len(pool) == 0 or len(members) == 0 or len(rest) == 0:
            return 0.0
        mask, own = shared_pixels(self.images[members], self.images[rest])
        if not mask.any():
            return 0.0
        rng = np.random.default_rng([self.seed, target, 2])
        recipients = self.images[rng.choice(pool, min(len(pool), DONORS_PER_CLUSTER * RECIPIENTS_PER_DONOR), replace=False)]
        pasted = np.where(mask, own[None], recipients).astype(recipients.dtype)
        return float((probabilities(self.model, pasted).argmax(1) == target).mean())

    def rates(self, donors: np.ndarray, target: int, recipients: int = RECIPIENTS_PER_DONOR,
              pixels: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per donor row: the share of its ``recipients`` whose prediction turns to ``target`` and its region's pixel
        share; then the pasted images and whether each turned. The regions hold ``REGION_MASS`` of each donor's
        relevance, or are its ``pixels`` most relevant pixels; the same donors meet the same recipients either way."""
        rng = np.random.default_rng([self.seed, target])
        pool = np.flatnonzero((self.labels != target) & (self.predictions != target))
        if len(pool) == 0 or len(donors) == 0:
            return np.zeros(len(donors)), np.zeros(len(donors)), self.images[:0], np.zeros(0, bool)
        masks = [region(self.relevance[d]) if pixels is None else top_pixels(self.relevance[d], pixels) for d in donors]
        transplant = Transplant(self.images[donors], np.stack(masks))
        pasted = [transplant.paste(self.images[rng.choice(pool, recipients, replace=len(pool) < recipients)], i) for i in range(len(donors))]
        shares = transplant.masks.reshape(len(donors), -1).mean(axis=1)
        pasted = np.concatenate(pasted)
        turned = probabilities(self.model, pasted).argmax(1) == target
        return turned.reshape(len(donors), recipients).mean(axis=1), np.asarray(shares), pasted, turned

    def of_class(self, result: ClassResult, donors_per_cluster: int = DONORS_PER_CLUSTER) -> list[ClusterEvidence]:
        """Every cluster of one SpRAy class result, tested on up to ``donors_per_cluster`` sampled members."""
        rng = np.random.default_rng([self.seed, result.class_index, 1])
        evidence, donors_of = [], []
        for cluster in range(result.n_clusters):
            members = result.indices[result.labels == cluster]
            donors = rng.choice(members, min(donors_per_cluster, len(members)), replace=False)
            rates, shares, pasted, turned = self.rates(donors, result.class_index)
            others = np.delete(self.chances[members], result.class_index, axis=1)
            evidence.append(ClusterEvidence(cluster, len(members), len(donors), float(rates.mean()) if len(rates) else 0.0,
                                            float(shares.mean()) if len(shares) else 0.0,
                                            float(others.max(axis=1).mean()) if others.size else 0.0, None,
                                            pasted[::RECIPIENTS_PER_DONOR][:EXAMPLES], turned[::RECIPIENTS_PER_DONOR][:EXAMPLES]))
            donors_of.append(donors)
        if _contested(evidence):  # the same transplant at one small size: what still carries the class is the artifact
            pixels = max(1, round(min(e.region_share for e in _carrying(evidence, CONTESTED_BAR)) * self.images[0, 0].size))
            for found, donors in zip(evidence, donors_of):
                rates = self.rates(donors, result.class_index, pixels=pixels)[0]
                found.small_rate = float(rates.mean()) if len(rates) else 0.0
        if self.token_grid:
            for found in evidence:
                inside = result.labels == found.cluster
                found.shared_rate = self.shared_rate(result.indices[inside], result.indices[~inside], result.class_index)
        return evidence


def _rate(evidence: list[ClusterEvidence], figure: str = "transplant_rate") -> float:
    """The size-weighted mean of a figure of some clusters: the transplant rate, or ``small_rate``."""
    weight = sum(e.size for e in evidence)
    return sum(getattr(e, figure) * e.size for e in evidence) / weight if weight else 0.0


def _carrying(evidence: list[ClusterEvidence], bar: float = ARTIFACT_BAR) -> list[ClusterEvidence]:
    """The clusters whose small regions carry the class into other images."""
    return [e for e in evidence if e.transplant_rate >= bar and e.region_share <= MAX_REGION_SHARE]


def _contested(evidence: list[ClusterEvidence]) -> bool:
    """Some cluster carries the class and another nearly does: sufficiency alone cannot say which is the artifact.

    On MNIST a "©" at random positions, backdoor to 0, made the model take a small ring anywhere for a 0: the clean
    0s' ring fragments turned 0.71-0.90 of other images, the tags' own regions 0.49-0.61 (4 models, 5% and 10%).
    """
    return bool(_carrying(evidence)) and len(_carrying(evidence, CONTESTED_BAR)) >= 2


def _holding_other_classes(evidence: list[ClusterEvidence]) -> list[ClusterEvidence]:
    """The clusters whose members' images also show another class, well apart from the rest of the class.

    A backdoor's samples are other classes' images with the artifact added, and the model still sees their class:
    its probability for the runner-up class was 0.08-0.17 in the tag clusters against 0.002-0.05 in the clean 0s'
    (the same 4 models). The clusters above the first gap of ``OTHER_CLASS_RATIO`` from the top are taken, when they
    reach ``MIN_OTHER_CLASS`` and their regions nearly carry the class (``CONTESTED_BAR``); none otherwise.
    """
    order = sorted(evidence, key=lambda e: -e.other_class)
    for cut in range(1, len(order)):
        top, rest = order[:cut], order[cut:]
        if min(e.other_class for e in top) >= max(OTHER_CLASS_RATIO * max(e.other_class for e in rest), MIN_OTHER_CLASS):
            return top if all(e in _carrying(evidence, CONTESTED_BAR) for e in top) else []
    return []


def _sufficient_when_small(evidence: list[ClusterEvidence], margin: float = ARTIFACT_MARGIN) -> list[ClusterEvidence]:
    """In a contested class, the clusters whose regions, cut to the smallest carrying cluster's size, still carry the
    class (``ARTIFACT_BAR``), each by ``margin`` more than any other cluster at that size; none otherwise (module
    docstring)."""
    if any(e.small_rate is None for e in evidence):
        return []
    order = sorted(evidence, key=lambda e: -e.small_rate)
    for cut in range(1, len(order)):
        top, rest = order[:cut], order[cut:]
        if top[-1].small_rate >= ARTIFACT_BAR and top[-1].small_rate - rest[0].small_rate >= margin:
            return top
    return []


def _sharing_pixels(evidence: list[ClusterEvidence], margin: float = ARTIFACT_MARGIN) -> list[ClusterEvidence]:
    """On a token grid, the clusters whose shared pixels carry the class (``ARTIFACT_BAR``), each by ``margin`` more
    than any other cluster's; none otherwise (module docstring)."""
    if any(e.shared_rate is None for e in evidence):
        return []
    order = sorted(evidence, key=lambda e: -e.shared_rate)
    for cut in range(1, len(order)):
        top, rest = order[:cut], order[cut:]
        if top[-1].shared_rate >= ARTIFACT_BAR and top[-1].shared_rate - rest[0].shared_rate >= margin:
            return top
    return []


def _decision(evidence: list[ClusterEvidence], margin: float = ARTIFACT_MARGIN) -> tuple[list[ClusterEvidence], str]:
    """The artifact clusters and the evidence that marked them: ``transplant``, ``other class``, ``small regions``,
    ``shared pixels`` or ``""`` (none)."""
    if _contested(evidence):
        held = _holding_other_classes(evidence)
        if held:
            return held, "other class"
        small = _sufficient_when_small(evidence, margin)
        if small:
            return small, "small regions"
    carrying = _carrying(evidence)
    rest = [e for e in evidence if e not in carrying]
    if carrying and rest and _rate(carrying) - _rate(rest) >= margin:
        return carrying, "transplant"
    shared = _sharing_pixels(evidence, margin)
    return (shared, "shared pixels") if shared else ([], "")


def artifact_clusters(evidence: list[ClusterEvidence], margin: float = ARTIFACT_MARGIN) -> list[int]:
    """The clusters that carry the class when the rest of the class does not (their rate beats the rest's by
    ``margin``) or, where another cluster nearly carries it too, whose members also show another class, or whose
    regions still carry it when cut small; empty when no test sets any cluster apart.

    Several clusters: an artifact on most of a class spans them (a frame on 90% of MNIST's 0s, labels kept: three of
    four clusters at 0.66-0.80, the clean one at 0.15).
    """
    return [e.cluster for e in _decision(evidence, margin)[0]]


def _hijackable(evidence: list[ClusterEvidence]) -> bool:
    """Some cluster's small regions carry the class, but they do not set it apart from the rest of the class."""
    return bool(_carrying(evidence)) and not artifact_clusters(evidence)


def verdict(evidence: list[ClusterEvidence]) -> str:
    """One sentence for the report and the CLI."""
    best = max(evidence, key=lambda e: e.transplant_rate, default=None)
    marked, by = _decision(evidence)
    if marked:
        several = len(marked) > 1
        names = f"cluster{'s' if several else ''} {', '.join(str(e.cluster) for e in marked)} {'are' if several else 'is'} the artifact"
        rate = _rate(marked)
        if by == "other class":
            rest = max(e.other_class for e in evidence if e not in marked)
            return (f"{names}: {'their' if several else 'its'} members' images also show another class (the model gives it "
                    f"{min(e.other_class for e in marked):.0%} or more, the rest of the class at most {rest:.0%}), as a backdoor's do; "
                    f"{'their' if several else 'its'} regions turn {rate:.0%} of other classes' images into this class, the rest's "
                    f"{_rate([e for e in evidence if e not in marked]):.0%} (too close to tell by the transplant alone)")
        if by == "small regions":
            size = min(e.region_share for e in _carrying(evidence, CONTESTED_BAR))
            rest = [e for e in evidence if e not in marked]
            return (f"{names}: cut to {size:.0%} of the image, {'their' if several else 'its'} regions still turn "
                    f"{_rate(marked, 'small_rate'):.0%} of other classes' images into this class, the rest's "
                    f"{_rate(rest, 'small_rate'):.0%} (at full size {rate:.0%} against {_rate(rest):.0%}: too close to tell)")
        if by == "shared pixels":
            rest = [e for e in evidence if e not in marked]
            return (f"{names}: the pixels {'their' if several else 'its'} members share, pasted into other classes' images, turn "
                    f"{_rate(marked, 'shared_rate'):.0%} of them into this class, the rest's {_rate(rest, 'shared_rate'):.0%} "
                    f"(the relevance regions, whole tokens: {rate:.0%} against {_rate(rest):.0%})")
        return f"{names}: {'their' if several else 'its'} regions turn {rate:.0%} of other classes' images into this class"
    if _hijackable(evidence):
        return (f"hijackable, artifact samples not isolated: the rest of the class's regions also turn {ARTIFACT_BAR:.0%} or more of "
                "other classes' images into this class (an artifact at a different place in every image?)")
    if best is not None and best.region_share > MAX_REGION_SHARE:
        return (f"inconclusive: the regions that carry the class cover {best.region_share:.0%} of the image, too much to tell an artifact "
                f"from the object (more than {MAX_REGION_SHARE:.0%}; low resolution?)")
    return f"no artifact found: no cluster's regions turn {ARTIFACT_BAR:.0%} of other classes' images into this class"


def summary(evidence: list[ClusterEvidence]) -> dict:
    """The figures audit.json keeps per class."""
    marked, by = _decision(evidence)
    return {"artifact_clusters": [e.cluster for e in marked], "artifact_evidence": by or None, "artifact_verdict": verdict(evidence),
            "hijackable": _hijackable(evidence), "cluster_evidence": [e.figures() for e in evidence]}


def nearest_miss(entries: list[dict]) -> str:
    """Where no class has a marked cluster: which cluster came closest to being marked, and why it was not, in words;
    "" where no class was analysed. ``entries``: audit.json's class entries (:func:`summary`).

    Closest is the cluster whose transplant rate leads the rest of its class by most: an artifact the model learned
    only weakly (a line on 60% of MNIST's 5s, 29% attack success) leads its class, while a class whose evidence anyone
    can paste (hijackable, ranked first) leads its own rest by little."""
    best = None
    for entry in entries:
        figures = entry.get("cluster_evidence") or []
        for cluster in figures:
            rest = [other for other in figures if other is not cluster]
            weight = sum(other["size"] for other in rest)
            rest_rate = sum(other["transplant_rate"] * other["size"] for other in rest) / weight if weight else 0.0
            lead = cluster["transplant_rate"] - rest_rate
            if best is None or lead > best[0]:
                best = (lead, entry, cluster, rest_rate)
    if best is None:
        return ""
    lead, entry, cluster, rest_rate = best
    rate = cluster["transplant_rate"]
    if cluster["region_share"] > MAX_REGION_SHARE:
        why = (f"its regions turn {rate:.0%} of other classes' images into the class (the rest of its class {rest_rate:.0%}), but "
               f"cover {cluster['region_share']:.0%} of the image, more than the {MAX_REGION_SHARE:.0%} an artifact's may: too "
               "much to tell an artifact from the object (low resolution?)")
    elif rate < ARTIFACT_BAR:
        why = (f"its regions turn {rate:.0%} of other classes' images into the class, under the {ARTIFACT_BAR:.0%} of an artifact the "
               f"model relies on (the rest of its class {rest_rate:.0%}): learned weakly, if at all")
    else:
        why = (f"its regions turn {rate:.0%} of other classes' images into the class, but the rest of its class's {rest_rate:.0%}, "
               f"less than {ARTIFACT_MARGIN:.0%} apart: the class's own evidence carries it as well")
    return f"closest: class {entry['class']}'s cluster {cluster['cluster']} ({cluster['size']} rows); {why}"


def marked_figure(entry: dict, cluster: int) -> str:
    """A marked cluster with the figure of the test that marked it, from :func:`summary`'s dict (audit.json's class
    entry), for the report's and the CLI's ranking tables."""
    figures = entry["cluster_evidence"][cluster]
    if entry.get("artifact_evidence") == "other class":
        return f"cluster {cluster} (other class {figures['other_class_probability']:.0%})"
    if entry.get("artifact_evidence") == "small regions":
        return f"cluster {cluster} (small-region transplant {figures['small_region_transplant_rate']:.0%})"
    return f"cluster {cluster} (transplant {figures['transplant_rate']:.0%})"


def rank_by_evidence(ranked: list[ClassResult], evidence: dict[int, list[ClusterEvidence]]) -> list[ClassResult]:
    """SpRAy's ranking with the classes that hold a marked artifact cluster moved first, then hijackable ones, each by
    their highest transplant rate.

    SpRAy's suspicion says a class splits; a digit written two ways splits too (on MNIST a "©" tag at random
    positions ranked 5th behind class 1). The intervention says which split is spurious, so it decides the order;
    SpRAy's order stays among the classes with no artifact found. Ranks are renumbered; skipped classes stay last.
    """
    def priority(result: ClassResult) -> tuple:
        found = evidence.get(result.class_index, [])
        best = max((e.transplant_rate for e in found), default=0.0)
        return not artifact_clusters(found), -best if _hijackable(found) else 0.0, result.rank

    order = sorted((r for r in ranked if r.spray is not None), key=priority)
    for position, result in enumerate(order, start=1):
        result.rank = position
    return order + [r for r in ranked if r.spray is None]
