"""What a correction costs on clean held-out data, and the bound it must stay within before it is deployed.

A projection that removes more than its artifact (a CAV fitted on the wrong cluster, a contrast set that mixes the
class's own look in) shows up here first: in issue 18's runs a wrong cluster silently cost 5.7-32.5 points of clean
accuracy. With labels the figure is clean accuracy before and after; without, the share of images whose top-1 class
the correction leaves unchanged. Both are judged overall and per class, since a correction that breaks one class of
many barely moves the overall figure.

Agreement counts every changed top-1 class as a cost, also changes between two wrong answers, and a few hundred photos
tell a rate of 1% only roughly: a correction changing exactly 1% of answers changes 7 or more of 500 one time in 4, 9 or more one time in 15
(binomial). So an agreement cost is refused only where its count of changes is beyond what a correction at the bound
would show with probability ``NOISE_ALPHA``, and the export says how many that is. EfficientNet-Lite0's ImageNet-W
correction changed 7 of 500 photos' top-1 class and cost 0.2 points of accuracy on held-out labelled photos; the
plain bound of 1 point on the count refused it. Accuracy (labels) is judged on its count as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

MAX_COST_PT = 1.0  # points of clean accuracy (or top-1 agreement) a correction may cost overall
MAX_CLASS_COST_PT = 10.0  # ... and any one class: a right CAV cost at most 4 on MNIST-5k, a wrong cluster 90-97
MIN_CLASS_SAMPLES = 20  # a class with fewer held-out images is reported, not judged: one image would be over 5 points
NOISE_ALPHA = 0.05  # an agreement cost is refused where a correction at the bound shows as many changes less often than this


def allowed_changes(images: int, max_pt: float, alpha: float = NOISE_ALPHA) -> int:
    """The most top-1 changes among ``images`` that a correction changing exactly ``max_pt`` percent of answers shows
    with probability at least ``alpha`` (one-sided binomial): 9 of 500 at 1 point, 3 of 125, 1 of 20."""
    from scipy.stats import binom

    rate = max_pt / 100
    if rate <= 0 or images == 0:
        return 0
    if rate >= 1:
        return images
    counts = np.arange(images + 1)
    return int(counts[binom.sf(counts - 1, images, rate) >= alpha].max())


@dataclass(frozen=True)
class ClassCost:
    """One class's figure before and after: accuracy on its images, or agreement on the images first predicted as it."""

    name: str
    samples: int
    correct_before: int
    correct_after: int

    @property
    def before(self) -> float:
        return self.correct_before / self.samples

    @property
    def after(self) -> float:
        return self.correct_after / self.samples

    @property
    def pt(self) -> float:
        """Points lost (negative: gained), from counts so that 10 of 1,000 images is exactly 1.0."""
        return 100 * (self.correct_before - self.correct_after) / self.samples


@dataclass(frozen=True)
class Cost:
    """The measured cost of one correction on ``source``, with the bounds it was judged against."""

    source: str
    labelled: bool
    overall: ClassCost
    agreement: float
    classes: tuple[ClassCost, ...]
    max_pt: float
    max_class_pt: float

    @property
    def metric(self) -> str:
        return "clean accuracy" if self.labelled else "top-1 agreement with the uncorrected model"

    @property
    def changes(self) -> int:
        """Images whose top-1 class the correction changes (without labels: the cost's count)."""
        return round(self.overall.samples * (1 - self.agreement))

    @property
    def allowed_changes(self) -> int | None:
        """Without labels, the most changes the bound accepts for this many images (:func:`allowed_changes`); None with labels."""
        return None if self.labelled else allowed_changes(self.overall.samples, self.max_pt)

    @property
    def over_bound(self) -> bool:
        """The overall cost is refused: accuracy lost beyond the bound, or more changes than the bound can explain."""
        return self.overall.pt > self.max_pt if self.labelled else self.changes > self.allowed_changes

    def noise(self) -> str:
        """The bound in words, with the noise of its count where it is agreement."""
        if self.labelled:
            return f"bound {self.max_pt:g} pt"
        return (f"bound {self.max_pt:g} pt: up to {self.allowed_changes} of {self.overall.samples} changes are within what "
                f"{self.overall.samples} images can tell (binomial, {1 - NOISE_ALPHA:.0%})")

    @property
    def worst_class(self) -> ClassCost | None:
        """The judged class (at least MIN_CLASS_SAMPLES images) that loses most, or None when no class is judged."""
        judged = [c for c in self.classes if c.samples >= MIN_CLASS_SAMPLES]
        return max(judged, key=lambda c: c.pt) if judged else None

    def check(self) -> None:
        """Refuse a correction that costs more than its bounds, naming the figure and the flag that accepts it."""
        overall, worst = self.overall, self.worst_class
        where = f"on {self.source} ({overall.samples} images)"
        if self.over_bound:
            changed = (f"{overall.before:.1%} -> {overall.after:.1%}" if self.labelled
                       else f"{self.changes} of {overall.samples} images change their top-1 class")
            raise InputError("--max-cost", f"the correction costs {overall.pt:.1f} points of {self.metric} {where}: {changed}, "
                             f"{self.noise()}; nothing was written",
                             f"{_likely_cause(self.labelled)}, or pass --max-cost {_above(overall.pt)} to accept it"
                             + ("" if self.labelled else "; --reactive corrects only the inputs its detector flags"))
        if worst is not None and worst.pt > self.max_class_pt:
            raise InputError("--max-class-cost", f"the correction costs class {worst.name} {worst.pt:.1f} points of {self.metric} "
                             f"{where}: {worst.before:.1%} -> {worst.after:.1%} of its {worst.samples} images, bound {self.max_class_pt:g}; "
                             "nothing was written", f"{_likely_cause(self.labelled)}, or pass --max-class-cost {_above(worst.pt)} to accept it")


def _likely_cause(labelled: bool) -> str:
    cause = "check the artifact samples (a CAV fitted on a cluster that is not the artifact does this)"
    return cause if labelled else cause + " or give more images"


def _above(pt: float) -> str:
    """The smallest whole number of points that accepts ``pt``."""
    return str(max(1, math.ceil(pt)))


@dataclass(frozen=True)
class HeldOut:
    """Clean images a correction is judged on, with the bounds; ``labels=None`` judges by agreement instead.

    ``source`` says in words what the images are (it is printed and written to the graph's metadata). ``baseline``:
    the outputs on ``images`` of the model that was served before, where that is not the corrected graph's own
    uncorrected model (a run fine-tuned by A-ClArC: its source run's), so that two corrections in a row are judged
    together against one bound, not each against the last.
    """

    images: np.ndarray
    labels: np.ndarray | None
    source: str
    classes: list[str] | None = None
    max_pt: float = MAX_COST_PT
    max_class_pt: float = MAX_CLASS_COST_PT
    baseline: np.ndarray | None = None

    def cost(self, logits_before: np.ndarray, logits_after: np.ndarray) -> Cost:
        """The cost of the correction whose logits on ``images`` are ``logits_after`` (the uncorrected model's:
        ``logits_before``, replaced by ``baseline`` where there is one)."""
        if self.baseline is not None:
            logits_before = self.baseline
        before, after = np.asarray(logits_before).argmax(1), np.asarray(logits_after).argmax(1)
        if len(before) != len(self.images) or len(after) != len(self.images):
            raise ValueError(f"{len(before)} and {len(after)} predictions for {len(self.images)} images")
        # with labels: per true class, right before / after; without: per first prediction, the same class after
        truth, groups = (self.labels, self.labels) if self.labels is not None else (before, before)
        names = self.classes or [str(c) for c in range(max(before.max(), after.max(), groups.max()) + 1)]
        right_before, right_after = before == truth, after == truth

        def figure(name, rows):
            return ClassCost(name, int(rows.sum()), int(right_before[rows].sum()), int(right_after[rows].sum()))

        classes = tuple(figure(names[c], groups == c) for c in np.unique(groups))
        return Cost(self.source, self.labels is not None, figure("all", np.ones(len(before), bool)),
                    float((before == after).mean()), classes, self.max_pt, self.max_class_pt)
