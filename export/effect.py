"""What a correction does to the artifact the audit found, measured before its graph is written.

The clean cost (core/cost.py) says what a correction breaks; it cannot say whether it removed anything. A correction
fitted on a piece of the artifact (a corner cut from stripes that cover the whole image) costs nothing and leaves the
backdoor in place: on MNIST-5k, stripes on every 3rd row as a backdoor to 8 at 10%, the paired correction from a 13x9
corner of them was written with a clean cost of 0-0.4 points and left 56-94% attack success. So every export is also
judged on the artifact itself, on up to two sets:

- **the artifact rows** (the audit's selection, ``--samples``): the share the model assigns to the artifact's class
  (the class it assigns most of them to before the correction) and its median logit margin, before and after. In a
  backdoor the rows are other classes' images and a working correction turns them away from the class; in a
  co-occurrence they are the class's own images, and stay. Which of the two holds is not in the rows, so the rows
  judge only against what the rows' own correction does to them (:attr:`Effect.other_route_rows`: the plain projection
  fitted on the rows themselves at the same layer; in the paired route that is the samples route, in the samples route
  the plain projection a reactive or own-class one replaced): where that turns them away, this correction must turn
  away its share. A reference that costs a class more than the clean-cost bound per class turns them away by removing
  the class with the artifact (a co-occurrence), so it does not count.
- **held-out pairs**: clean images of other classes (the run's test set) with and without the artifact pasted in: the
  artifact image of the paired route, or each artifact row's own region (what the audit's transplant test pasted to
  mark the cluster). The share of them the artifact turns into the class, before and after.

The correction removes ``removed`` of the artifact's effect: the smaller of the two where both show an effect (at
least ``MIN_EFFECT``), else the one that does; under ``MIN_REMOVED`` it is refused and nothing is written, with the
better route named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..core.errors import InputError

MIN_REMOVED = 0.5  # a correction must remove this share of the artifact's effect, else it is refused (--min-removed)
MIN_EFFECT = 0.2  # a set shows an effect when the artifact turns this share of it into the class (rows: the other route can undo)
PAIR_IMAGES = 500  # held-out clean images the artifact is pasted into
MIN_FLAG = "--min-removed"

Logits = Callable[[np.ndarray], np.ndarray]  # images -> logits, of the uncorrected or the corrected graph
Reference = Callable[[np.ndarray], "np.ndarray | None"]  # images -> logits of the rows' own correction, None where it is no fair one


@dataclass(frozen=True)
class EffectKeys:
    """The graph metadata keys (after ``unhans.``) an effect is stored under; ``unhans inspect`` shows them."""

    removed: str = "effect.removed"
    class_: str = "effect.class"
    rows: str = "effect.rows"
    rows_as_class: str = "effect.rows_as_class"  # "before -> after"
    rows_margin: str = "effect.rows_margin"  # median logit margin of the class, "before -> after"
    other_route_rows: str = "effect.other_route_rows_as_class"
    pairs: str = "effect.pairs"
    pairs_turned: str = "effect.pairs_turned"  # "before -> after"
    bound: str = "effect.bound"


EFFECT = EffectKeys()


def margin(logits: np.ndarray, target: int) -> np.ndarray:
    """The class's logit minus the largest other logit, per image."""
    others = np.delete(logits, target, axis=1)
    return logits[:, target] - others.max(axis=1)


@dataclass(frozen=True)
class Effect:
    """A correction's effect on the artifact (module docstring); shares are of images predicted as ``target``."""

    target: int
    class_name: str
    rows: int
    rows_as_class: tuple[float, float] | None  # before, after
    rows_margin: tuple[float, float] | None
    other_route_rows: float | None  # share of the rows still the class under the other route's correction
    rows_source: str
    pairs: int
    pairs_turned: tuple[float, float] | None  # share of the pasted images turned into the class (beyond the unpasted), before, after
    pairs_source: str
    bound: float = MIN_REMOVED

    @property
    def removed_rows(self) -> float | None:
        """The share of what the other route turns away from the class that this correction turns away; None where the
        other route turns fewer than ``MIN_EFFECT`` of the rows away (nothing to compare: a co-occurrence)."""
        if self.rows_as_class is None or self.other_route_rows is None:
            return None
        before, after = self.rows_as_class
        reachable = before - self.other_route_rows
        return None if reachable < MIN_EFFECT else float(np.clip((before - after) / reachable, 0, 1))

    @property
    def removed_pairs(self) -> float | None:
        """The share of the pairs' turn into the class the correction removes; None where the artifact turns fewer than
        ``MIN_EFFECT`` of them before (its pasted copy does not carry the class)."""
        if self.pairs_turned is None or self.pairs_turned[0] < MIN_EFFECT:
            return None
        before, after = self.pairs_turned
        return float(np.clip((before - after) / before, 0, 1))

    @property
    def removed(self) -> float | None:
        """The share of the artifact's effect removed: the smaller of the two measures that show an effect; None
        where neither does (then nothing can be judged, and the export says so)."""
        shown = [value for value in (self.removed_rows, self.removed_pairs) if value is not None]
        return min(shown) if shown else None

    def describe(self) -> dict[str, str]:
        """Rows for the export's table."""
        shown = {}
        if self.rows_as_class is not None:
            text = f"{self.rows_as_class[0]:.1%} -> {self.rows_as_class[1]:.1%} ({self.rows} rows, {self.rows_source})"
            if self.other_route_rows is not None:
                text += f"; the correction fitted on the rows themselves leaves {self.other_route_rows:.1%}"
            shown[f"artifact rows predicted {self.class_name}"] = text
            shown[f"their median margin for {self.class_name}"] = f"{self.rows_margin[0]:+.2f} -> {self.rows_margin[1]:+.2f}"
        if self.pairs_turned is not None:
            shown[f"held-out pairs turned into {self.class_name}"] = (f"{self.pairs_turned[0]:.1%} -> {self.pairs_turned[1]:.1%} "
                                                                       f"({self.pairs} images, {self.pairs_source})")
        removed = self.removed
        shown["artifact effect removed"] = ("not judged: neither set shows an effect to remove" if removed is None
                                            else f"{removed:.0%} (bound {self.bound:.0%})")
        return shown

    def metadata(self) -> dict[str, str]:
        """Graph metadata under :data:`EFFECT`'s keys."""
        pair = lambda values: "none" if values is None else f"{values[0]:.4f} -> {values[1]:.4f}"  # noqa: E731
        removed = self.removed
        return {EFFECT.removed: "not judged" if removed is None else f"{removed:.4f}", EFFECT.class_: self.class_name,
                EFFECT.rows: f"{self.rows} ({self.rows_source})", EFFECT.rows_as_class: pair(self.rows_as_class),
                EFFECT.rows_margin: pair(self.rows_margin),
                EFFECT.other_route_rows: "none" if self.other_route_rows is None else f"{self.other_route_rows:.4f}",
                EFFECT.pairs: f"{self.pairs} ({self.pairs_source})", EFFECT.pairs_turned: pair(self.pairs_turned),
                EFFECT.bound: f"{self.bound:g}"}

    def check(self, better: str) -> None:
        """Refuse a correction that leaves most of the artifact's effect in place, naming ``better``, the route to take."""
        removed = self.removed
        if removed is None or removed >= self.bound:
            return
        parts = []
        if self.removed_rows is not None:
            parts.append(f"{self.rows_as_class[1]:.0%} of the artifact rows are still predicted {self.class_name} "
                         f"(before {self.rows_as_class[0]:.0%}; fitted on the rows themselves {self.other_route_rows:.0%})")
        if self.removed_pairs is not None:
            parts.append(f"the artifact still turns {self.pairs_turned[1]:.0%} of held-out images into {self.class_name} "
                         f"(before {self.pairs_turned[0]:.0%})")
        raise InputError(MIN_FLAG, f"the correction removes only {removed:.0%} of the artifact's effect: {'; '.join(parts)}; "
                         "nothing was written", f"{better} (or pass {MIN_FLAG} 0 to write it anyway)")


@dataclass(frozen=True)
class ArtifactProbe:
    """The images an export judges its correction's effect on (module docstring), and how to say so."""

    rows: np.ndarray | None  # the artifact rows' images
    rows_source: str = ""
    pasted: np.ndarray | None = None  # held-out images with the artifact, and ...
    unpasted: np.ndarray | None = None  # ... the same without it
    pairs_source: str = ""
    other_route: Reference | None = None  # logits of the plain projection fitted on the rows themselves, the rows' reference
    classes: list[str] | None = None
    bound: float = MIN_REMOVED
    better: str = ""  # the route to name when refused

    def effect(self, before: Logits, after: Logits) -> Effect | None:
        """The effect of the correction whose graph gives ``after`` (the uncorrected one: ``before``); None where there
        is nothing to measure on."""
        has_rows = self.rows is not None and len(self.rows) > 0
        has_pairs = self.pasted is not None and len(self.pasted) > 0
        if not has_rows and not has_pairs:
            return None
        if has_rows:  # the class the artifact pushes to: the one most rows are assigned to, or most pairs turn into
            first = before(self.rows)
            target = int(np.bincount(first.argmax(1), minlength=first.shape[1]).argmax())
        else:
            pasted, unpasted = (before(images).argmax(1) for images in (self.pasted, self.unpasted))
            size = int(max(pasted.max(), unpasted.max())) + 1
            target = int((np.bincount(pasted, minlength=size) - np.bincount(unpasted, minlength=size)).argmax())
        name = self.classes[target] if self.classes else str(target)
        rows_as_class = rows_margin = other = None
        if has_rows:
            last = after(self.rows)
            rows_as_class = (float((first.argmax(1) == target).mean()), float((last.argmax(1) == target).mean()))
            rows_margin = (float(np.median(margin(first, target))), float(np.median(margin(last, target))))
            reference = self.other_route(self.rows) if self.other_route is not None else None
            if reference is not None:
                other = float((reference.argmax(1) == target).mean())
        turned = None
        if has_pairs:
            def turn(logits: Logits) -> float:
                with_, without = (logits(images).argmax(1) == target for images in (self.pasted, self.unpasted))
                return float(max(0.0, with_.mean() - without.mean()))
            turned = (turn(before), turn(after))
        return Effect(target, name, len(self.rows) if has_rows else 0, rows_as_class, rows_margin, other, self.rows_source,
                      len(self.pasted) if has_pairs else 0, turned, self.pairs_source, self.bound)
