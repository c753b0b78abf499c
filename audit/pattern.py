"""The rows that show an artifact, found by its pixels: the image patch the selected rows share, matched anywhere in an
image where the artifact moves, and at its place where it has one.

A tag or logo pasted at a different place in every image forms no region of its own (:attr:`audit.region.Region.moves`),
and SpRAy's cluster of it is impure: on MNIST-5k a "©" at random positions, backdoor to 0 at 2%, gave a cluster of
precision 0.76 and recall 0.82 against the truly tagged rows, because in a tenth of the tagged rows the tag holds no
more of the relevance than any other eighth of the image. A fixed artifact's clusters can be impure too: a corner patch
on 45% of the 0s, labels kept, gave two clusters with 27 clean 0s among 207 rows (precision 0.87). But an artifact's
pixels are the same in every image that carries it. So the rows that carry it are found by what they show, not by how
the model explains them. Where it has a place (:func:`pattern_at`), the pattern is its region's pixels (the selected
rows' per-pixel median in the region's box), matched there only, under the bar of step 2 and those of step 4. Where it moves
(:func:`find_pattern`):

1. **Candidates**: in each of up to ``CANDIDATE_ROWS`` sampled rows of the selection, the window where its positive
   relevance is densest, at a few sizes around the side of the rows' median region (``SIDES``).
2. **The pattern** is the candidate whose best match anywhere in an image (normalised cross-correlation) tells the
   selection from the rest of its class best (the area under the ROC curve, on up to ``EVALUATION_ROWS`` of each).
   An artifact recurs in most of the selection and rarely elsewhere; a piece of the object recurs everywhere in the
   class. Below ``MIN_SEPARATION`` no pattern is taken and the selection stays as it is.
3. **Refined** (``REFINEMENTS`` rounds): the per-pixel median of the windows it matches in the rows of its class above Otsu's threshold
   of their scores, cropped to where the median shows. Cut from one row, the candidate still holds that row's
   strokes; the median over its matches keeps only what they share.
4. **The rows** are those of the selection's classes whose best match beats ``NULL_QUANTILE`` of the other classes'
   rows' (images the artifact is not in). 99.9%, not 99%: the class's own clean images can look more like the
   artifact than other classes' do (a "©" and a 0 are both rings: 99% of the other digits matched below 0.33-0.38,
   the clean 0s up to 0.37). Taken only when they keep ``MIN_KEPT`` of the selection: a pattern that keeps less
   describes something else; nor when it covers more than ``MAX_REGION_SHARE`` of the image (the bar of the
   transplant test, audit/clusters.py): an artifact is small. Where the artifact sits at one place after all and
   most of the class carries it (a text on 90% of the 0s, labels kept), the matches all lie at that place, their
   median is the class's typical shape around it, and that grew to 22x22 px of MNIST's 28x28.

Measured on the kept grid runs (VGG, 5 epochs; precision / recall against the truly tagged rows): "©" backdoor to 0
at 2%, 5% and 10% (two seeds), chosen clusters 0.76/0.82, 0.98/0.83, 0.98/0.93 and 0.99/0.95, refined to 1.00/0.96,
1.00/0.97, 1.00/0.95 and 1.00/0.96 (separation 0.92-0.97; the glyph itself, as an oracle, gives an AUC of 0.9997
in the class). The search takes about 2 s on 4,000 MNIST images (`--select` 8.2 s against 6.2 s with `--cluster-rows`;
it was 25 s with scikit-image's `match_template` image by image: :class:`Matcher`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.progress import Progress
from scipy import fft, ndimage

from .clusters import ARTIFACT_PIXEL, MAX_REGION_SHARE, SURE

CANDIDATE_ROWS = 48  # sampled rows of the selection whose densest window is a candidate pattern
EVALUATION_ROWS = 96  # rows of the selection and of the rest of its class each candidate is matched in
SIDES = (0.75, 1.0, 1.5, 2.0)  # candidate window sides, times the side of the rows' median region
MIN_SEPARATION = 0.8  # the pattern's AUC, selection against the rest of its class, it must reach to be taken
NULL_QUANTILE = 0.999  # a row holds the pattern when its match beats this share of other classes' rows
MIN_KEPT = 0.5  # the rows holding the pattern must keep this share of the selection, else it is not taken
REFINEMENTS = 2  # rounds of step 3: the second settles what the first grew back
SHOWN = 0.1  # the refined pattern is cropped to where its median reaches this share of its peak
MATCH_BATCH = 64  # images transformed at once when matching (a batch of 224-px RGB spectra is some 40 MB)
PATTERN_FILE = "artifact-pattern.png"  # what `unhans audit --select` writes beside samples.npz when a pattern refines it


@dataclass(eq=False)
class Pattern:
    """A recurring patch (h, w, C) and the dataset rows that hold it."""

    template: np.ndarray
    separation: float  # AUC of the chosen candidate, selection against the rest of its class
    threshold: float  # the match a row must beat: NULL_QUANTILE of the other classes' rows
    rows: np.ndarray  # dataset rows of the selection's classes whose match beats it
    selected: int  # rows in the selection it refines
    kept: int  # of them, rows that hold the pattern
    place: tuple[int, int] | None = None  # top-left corner where a fixed artifact is matched; None: anywhere
    kept_by_pixels: int = 0  # selected rows under the match's bar kept because they show the artifact's own pixels

    @property
    def added(self) -> int:
        return len(self.rows) - self.kept

    def figures(self) -> dict:
        where = "anywhere in the image" if self.place is None else f"at {self.place[0]},{self.place[1]}"
        return {"size": list(self.template.shape[:2]), "matched": "anywhere" if self.place is None else list(self.place),
                "separation": self.separation, "threshold": self.threshold,
                "rows": len(self.rows), "selected": self.selected, "kept": self.kept, "added": self.added,
                "kept_by_pixels": self.kept_by_pixels, "dropped": self.selected - self.kept,
                "rule": f"normalised cross-correlation {where} above the {NULL_QUANTILE:.1%} quantile of other classes' rows' "
                        "best match anywhere (audit/pattern.py)"}

    def rgba(self) -> np.ndarray:
        """The pattern as (h, w, 4) uint8, opaque (grey repeated for one channel), for the report and the user."""
        colour = self.template if self.template.shape[2] != 1 else np.repeat(self.template, 3, axis=2)
        alpha = np.ones((*self.template.shape[:2], 1), np.float32)
        return np.round(np.clip(np.concatenate([colour[..., :3], alpha], axis=2), 0, 1) * 255).astype(np.uint8)


class Matcher:
    """The best normalised cross-correlation of a template anywhere in each of many images (N, H, W, C), and where.

    The figure is scikit-image's ``match_template`` (valid positions, all channels together, 0 where a window is
    flat), but for a batch at once: the correlation by FFT with the template's spectrum summed over channels before
    the inverse transform, the windows' sums from integral images. The candidate search matches some 200 templates
    in the same few hundred images, so their spectra are kept (``cache``); the final scoring of a whole dataset
    transforms ``MATCH_BATCH`` images at a time and keeps nothing. In float64: in float32 the correlation's rounding
    swamps a nearly flat window's spread (an MNIST window with one faint pixel scored 39). One template against 96
    random RGB 224-px images: 0.24 s against 5.0 s image by image with ``match_template``; against 192 MNIST images
    3 ms against 111 ms (tests/test_pattern.py checks the figures against it)."""

    def __init__(self, images: np.ndarray, cache: bool = True):
        self.images = images
        self.shape = images.shape[1:3]
        self.size = tuple(fft.next_fast_len(int(side), real=True) for side in self.shape)
        starts = range(0, len(images), MATCH_BATCH)
        self._batches = [self._prepared(start) for start in starts] if cache else None
        self._starts = starts

    def _prepared(self, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One batch's spectrum and the integral images of its pixels and their squares (float64, summed over channels)."""
        pixels = self.images[start:start + MATCH_BATCH].astype(np.float64)
        return fft.rfft2(pixels, s=self.size, axes=(1, 2)), _integral(pixels), _integral(pixels ** 2)

    def best(self, template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per image: the best match of ``template`` (h, w, C) and the top-left corner of its window (N, 2)."""
        h, w = template.shape[:2]
        height, width = self.shape
        volume = template.size
        centred = template.astype(np.float64) - template.mean()
        spread = float((centred ** 2).sum())
        kernel = fft.rfft2(template[::-1, ::-1].astype(np.float64), s=self.size, axes=(0, 1))
        scores, corners = np.zeros(len(self.images)), np.zeros((len(self.images), 2), int)
        for index, start in enumerate(self._starts):
            spectrum, sums, squares = self._batches[index] if self._batches is not None else self._prepared(start)
            correlation = fft.irfft2((spectrum * kernel).sum(axis=3), s=self.size, axes=(1, 2))[:, h - 1:height, w - 1:width]
            window_sums, window_squares = _window_sums(sums, h, w), _window_sums(squares, h, w)
            variance = window_squares - window_sums ** 2 / volume  # times the volume
            flat = (variance <= 1e-7 * window_squares) | (spread == 0)  # float64 cancellation leaves ~1e-16 of a flat window
            match = np.where(flat, 0.0, (correlation - window_sums * template.mean()) / np.sqrt(np.maximum(variance, 1e-300) * max(spread, 1e-300)))
            flat_best = match.reshape(len(match), -1).argmax(axis=1)
            rows = slice(start, start + len(match))
            scores[rows] = match.reshape(len(match), -1)[np.arange(len(match)), flat_best]
            corners[rows] = np.stack(np.unravel_index(flat_best, match.shape[1:]), axis=1)
        return scores, corners


def _integral(values: np.ndarray) -> np.ndarray:
    """Integral images (N, H + 1, W + 1) of (N, H, W, C), summed over channels, with a zero first row and column."""
    return np.pad(values.sum(axis=3).cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))


def _window_sums(integral: np.ndarray, h: int, w: int) -> np.ndarray:
    """The sum of every h x w window (valid positions) from integral images."""
    return integral[:, h:, w:] - integral[:, :-h, w:] - integral[:, h:, :-w] + integral[:, :-h, :-w]


def _densest_window(relevance: np.ndarray, side: int) -> tuple[int, int]:
    """Top-left corner of the ``side`` square holding the most positive relevance of one map (H, W)."""
    density = ndimage.uniform_filter(np.clip(relevance, 0, None), side, mode="constant")
    row, col = np.unravel_index(np.argmax(density), density.shape)
    height, width = relevance.shape
    return min(max(row - side // 2, 0), height - side), min(max(col - side // 2, 0), width - side)


def _auc(inside: np.ndarray, outside: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(inside)), np.zeros(len(outside))], np.r_[inside, outside]))


def find_pattern(images: np.ndarray, labels: np.ndarray, selected: np.ndarray, relevance: dict[int, np.ndarray],
                 region_pixels: float, seed: int = 0, advance=None) -> tuple[Pattern | None, str]:
    """The pattern the ``selected`` dataset rows share (module docstring) and ""; or None and which bar it missed.

    ``images`` (N, C, H, W) are the audited images, ``relevance`` maps each selected row to its input relevance
    summed over channels (H, W), ``region_pixels`` is the rows' median region size in pixels; ``advance(total)``,
    where given, is called once per step of the search with the number of steps (for progress)."""
    pictures = _pictures(images)
    height, width = pictures.shape[1:3]
    selected = np.unique(selected)
    classes, rest, why = _classes(labels, selected)
    if why:
        return None, why
    rng = np.random.default_rng(seed)
    sample = lambda rows, count: rng.choice(rows, min(count, len(rows)), replace=False)  # noqa: E731
    inside, outside = sample(selected, EVALUATION_ROWS), sample(rest, EVALUATION_ROWS)
    evaluation = Matcher(pictures[np.r_[inside, outside]])
    sides = sorted({min(max(3, round(share * np.sqrt(region_pixels))), height, width) for share in SIDES})
    candidates = sample(selected, CANDIDATE_ROWS)
    steps = len(sides) * len(candidates) + REFINEMENTS + 1
    advance = advance or (lambda total: None)
    best, template = -1.0, None
    for side in sides:
        for row in candidates:
            advance(steps)
            top, left = _densest_window(relevance[int(row)], side)
            candidate = pictures[row, top:top + side, left:left + side]
            if candidate.std() == 0:
                continue
            scores = evaluation.best(candidate)[0]
            separation = _auc(scores[:len(inside)], scores[len(inside):])
            if separation > best:
                best, template = separation, candidate
    if template is None or best < MIN_SEPARATION:
        return None, (f"no image patch tells the selected rows from the rest of their class (best AUC {max(best, 0):.2f}, "
                      f"needs {MIN_SEPARATION})")
    for _ in range(REFINEMENTS):
        advance(steps)
        template = _refined(pictures, np.flatnonzero(classes), template)
        if template is None:
            return None, "the patch's matches share no pixels"
        if template.shape[0] > height or template.shape[1] > width:  # grown past a small image's edges: it is no patch of it
            return None, f"the patch they share grew to {template.shape[0]}x{template.shape[1]} px, larger than the {height}x{width} image"
    share = template.shape[0] * template.shape[1] / (height * width)
    if share > MAX_REGION_SHARE:
        return None, (f"the patch they share covers {share:.0%} of the image, more than an artifact's {MAX_REGION_SHARE:.0%}: "
                      "it is the class's typical shape")
    advance(steps)
    return _rows_showing(pictures, classes, selected, template, best)


def pattern_at(images: np.ndarray, labels: np.ndarray, selected: np.ndarray, template: np.ndarray,
               place: tuple[int, int]) -> tuple[Pattern | None, str]:
    """The rows that show an artifact with a place of its own: ``template`` (h, w, C), the selected rows' per-pixel
    median in their region's box, matched at ``place`` (its top-left corner) only; or None and which bar it missed.

    At its place the artifact is matched where it is, so a clean image with a look-alike stroke elsewhere stays out:
    on the corner-patch backdoor at 2% matching anywhere added 2 clean 0s (precision 0.97), in place none. The bar is
    the one of :func:`find_pattern` (other classes' best match anywhere), and so are the separation and the kept share."""
    pictures = _pictures(images)
    selected = np.unique(selected)
    (top, left), (h, w) = place, template.shape[:2]
    share = h * w / (pictures.shape[1] * pictures.shape[2])
    if share > MAX_REGION_SHARE:
        return None, f"their region's box covers {share:.0%} of the image, more than the {MAX_REGION_SHARE:.0%} matched as one patch"
    if template.std() == 0:
        return None, "their region's pixels are flat"
    classes, rest, why = _classes(labels, selected)
    if why:
        return None, why
    boxes = pictures[:, top:top + h, left:left + w]
    scores = Matcher(boxes, cache=False).best(template)[0]
    separation = _auc(scores[selected], scores[rest])
    if separation < MIN_SEPARATION:
        return None, (f"their region's pixels do not tell them from the rest of their class (AUC {separation:.2f}, needs "
                      f"{MIN_SEPARATION})")
    return _rows_showing(pictures, classes, selected, template, separation, place, scores,
                         keep=selected[_show_pixels(boxes[selected], template, np.median(boxes[rest], axis=0))])


def _show_pixels(boxes: np.ndarray, template: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per box (N, h, w, C): whether it shows the artifact's own pixels, those where ``template`` differs most from the
    ``background`` (the rest of the class's median; at least ``ARTIFACT_PIXEL`` of the largest difference), in
    ``SURE`` of them nearer the template than the background.

    The match of the whole box falls where the object's strokes enter it (a 1-px line crossed by a digit: 19-29% of the
    rows the cluster had right fell under the bar), but an artifact pasted over the image keeps its own pixels; a row
    without it shows the background there. So a selected row is dropped only when it lacks them: sure, not a guess."""
    difference = np.abs(template - background).max(axis=2)
    own = difference >= ARTIFACT_PIXEL * difference.max()
    nearer = np.abs(boxes - template).max(axis=3) < np.abs(boxes - background).max(axis=3)
    return nearer[:, own].mean(axis=1) >= SURE


def _pictures(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) images as the (N, H, W, C) float32 pictures the matcher reads."""
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1), dtype=np.float32)


def _classes(labels: np.ndarray, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """The mask of the selection's classes, the rest of their rows, and why no pattern can be judged ("" if it can)."""
    classes = np.isin(labels, np.unique(labels[selected]))
    rest = np.setdiff1d(np.flatnonzero(classes), selected)
    if len(rest) == 0 or classes.all():
        return classes, rest, "their classes hold no other rows to tell them from, or no other class gives a null"
    return classes, rest, ""


def _rows_showing(pictures: np.ndarray, classes: np.ndarray, selected: np.ndarray, template: np.ndarray, separation: float,
                  place: tuple[int, int] | None = None, scores: np.ndarray | None = None,
                  keep: np.ndarray | None = None) -> tuple[Pattern | None, str]:
    """Step 4: the rows of the selection's classes whose ``scores`` (default: the best match anywhere) beat
    ``NULL_QUANTILE`` of the other classes' best match anywhere, and the selected rows ``keep`` (those that show the
    artifact's pixels), if they keep ``MIN_KEPT`` of the selection."""
    anywhere = Matcher(pictures, cache=False).best(template)[0]
    threshold = float(np.quantile(anywhere[~classes], NULL_QUANTILE))
    matched = classes & ((anywhere if scores is None else scores) > threshold)
    rows = np.union1d(np.flatnonzero(matched), keep if keep is not None else [])
    kept = int(np.isin(selected, rows).sum())
    if kept < MIN_KEPT * len(selected):
        return None, f"the rows that show the patch hold only {kept} of the {len(selected)} selected: it describes something else"
    by_pixels = 0 if keep is None else int((~matched[keep]).sum())
    return Pattern(template, separation, threshold, rows.astype(np.int64), len(selected), kept, place, by_pixels), ""


def _refined(pictures: np.ndarray, rows: np.ndarray, template: np.ndarray) -> np.ndarray | None:
    """Step 3: the median of the windows (grown by half the pattern each side, so a candidate cut off at an edge grows
    back) that ``template`` matches in the ``rows`` scoring above Otsu's threshold, cropped to where it differs from
    the window's border (the background); None where nothing shows."""
    from skimage.filters import threshold_otsu

    scores, corners = Matcher(pictures[rows], cache=False).best(template)
    matched = scores > threshold_otsu(scores) if np.ptp(scores) > 0 else np.ones(len(rows), bool)
    h, w = template.shape[:2]
    grow = max(1, -(-max(h, w) // 2))
    padded = np.pad(pictures[rows[matched]], ((0, 0), (grow, grow), (grow, grow), (0, 0)))
    windows = [padded[i, r:r + h + 2 * grow, c:c + w + 2 * grow] for i, (r, c) in enumerate(corners[matched])]
    median = np.median(windows, axis=0)
    border = np.concatenate([median[0], median[-1], median[:, 0], median[:, -1]])
    shown = np.abs(median - np.median(border, axis=0)).max(axis=2)
    if shown.max() <= 0:
        return None
    rr, cc = np.nonzero(shown >= SHOWN * shown.max())
    refined = median[rr.min():rr.max() + 1, cc.min():cc.max() + 1]
    return refined if refined.std() > 0 else None


def pattern_of_selection(inputs, rows: np.ndarray, console) -> tuple[Pattern | None, str]:
    """For ``unhans audit --select``: the rows that show the selected rows' artifact, and why not where none are
    taken. Where the artifact moves (its region has no place of its own), the pattern the rows share, matched anywhere
    (:func:`find_pattern`, with progress on ``console``); where it has a place, its region's pixels matched there
    (:func:`pattern_at`). ``inputs`` is the selection's :class:`audit.region.SelectionInputs`."""
    from .clusters import region
    from .region import find_region
    from .spec import INPUT

    labels = inputs.dataset.labels
    found = find_region(inputs.store, inputs.pixels, labels, rows, inputs.token_grid)
    if found is None:
        return None, ""
    if found.everywhere:
        return None, ("the artifact is spread over the image, so it has no place to match its pixels at; the clusters' rows are "
                      "kept as they are")
    if not found.moves:
        top, left, h, w = found.box
        template = found.pixels[:, top:top + h, left:left + w].transpose(1, 2, 0)
        pattern, why = pattern_at(inputs.pixels, labels, rows, template, (top, left))
        return pattern, why and f"{why}; the clusters' rows are kept as they are"
    relevance = {int(row): map_.sum(axis=0) for batch_rows, maps in inputs.store.rows(INPUT, np.unique(rows)) for row, map_ in zip(batch_rows, maps)}
    region_pixels = float(np.median([region(map_).sum() for map_ in relevance.values()]))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("the artifact moves: searching the image pattern the selected rows share", total=None)
        pattern, why = find_pattern(inputs.pixels, labels, rows, relevance, region_pixels,
                                    advance=lambda total: progress.update(task, total=total, advance=1))
    if pattern is None:
        return None, f"the artifact moves, but {why}; the clusters' rows are kept as they are"
    return pattern, ""
