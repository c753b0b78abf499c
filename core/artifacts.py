"""Spurious artifacts (a text tag, a patch, a 1-px line, a border frame, stripes over the whole image, a colour cast, a
user's own watermark image) that poison data and probe models.

An artifact is drawn as a *stamp*: an opacity map ``alpha`` (H, W) in [0, 1] and the colour ``value``
(C, H, W) it lays down, composited as ``x' = x (1 - alpha) + value alpha``. Its mask is ``alpha > 0``: exactly
the pixels the artifact writes to. Artifacts are plain dataclasses so a scenario can be stored as JSON and
rebuilt with :func:`artifact_from_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import numpy as np

from .errors import InputError

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")


@lru_cache(maxsize=32)
def _text_alpha(text: str, size: int) -> np.ndarray:
    """Opacity of ``text`` rendered with Pillow's built-in font (no font file or download needed)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    canvas = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(canvas).text((-left, -top), text, fill=255, font=font)
    alpha = np.asarray(canvas, dtype=np.float32) / 255.0
    rows, cols = np.nonzero(alpha)
    return alpha[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


@dataclass
class Artifact:
    """Base class: subclasses draw their glyph; placement and compositing live here."""

    position: str | tuple[int, int] = "bottom-right"
    margin: int = 1
    color: float | tuple[float, ...] = 1.0

    kind = "artifact"
    placed = True  # False: the artifact covers the whole image (a frame, stripes, a cast) and takes no position

    def glyph(self) -> tuple[np.ndarray, np.ndarray]:
        """The artifact's own opacity (h, w) and brightness (h, w) pattern, before placement."""
        raise NotImplementedError

    def _offset(self, height: int, width: int, glyph_shape: tuple[int, int], rng: np.random.Generator | None):
        h, w = glyph_shape
        position = self.position
        if isinstance(position, (tuple, list)):  # a place given: the margin is only for the named and random ones
            row, col = int(position[0]), int(position[1])
            if not (0 <= row <= height - h and 0 <= col <= width - w):
                raise InputError("position", f"{position} puts the {h}x{w} artifact outside the {height}x{width} image", "choose a position inside it")
            return row, col
        if h + 2 * self.margin > height or w + 2 * self.margin > width:
            raise InputError(
                f"{self.kind} artifact", f"is {h}x{w} pixels with margin {self.margin}, larger than the {height}x{width} image", "make it smaller"
            )
        low, high_r, high_c = self.margin, height - h - self.margin, width - w - self.margin
        if position == "random":
            if rng is None:
                raise ValueError("position='random' needs a random generator")
            return int(rng.integers(low, high_r + 1)), int(rng.integers(low, high_c + 1))
        table = {
            "top-left": (low, low),
            "top-right": (low, high_c),
            "bottom-left": (high_r, low),
            "bottom-right": (high_r, high_c),
            "center": ((height - h) // 2, (width - w) // 2),
        }
        if position not in table:
            raise InputError("position", f"{position!r} is unknown", f"use one of {CORNERS}, 'random' or (row, col)")
        return table[position]

    def stamp(self, shape: tuple[int, int, int], rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Opacity (H, W) and colour (C, H, W) of the artifact placed on an image of ``shape`` (C, H, W)."""
        channels, height, width = shape
        glyph_alpha, glyph_value = self.glyph()
        row, col = self._offset(height, width, glyph_alpha.shape, rng)
        alpha = np.zeros((height, width), np.float32)
        value = np.zeros((channels, height, width), np.float32)
        h, w = glyph_alpha.shape
        alpha[row : row + h, col : col + w] = glyph_alpha
        color = np.broadcast_to(np.asarray(self.color, np.float32), (channels,))
        if glyph_value.ndim == 3:  # a glyph with colours of its own (an RGB watermark): grey where the image is grey
            glyph_value = glyph_value.mean(0, keepdims=True) if channels == 1 else glyph_value
        value[:, row : row + h, col : col + w] = color[:, None, None] * glyph_value.reshape(-1, h, w)
        return alpha, value

    def apply(self, images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Paste the artifact into every image (N, C, H, W); returns the new images and the masks (N, H, W).

        With a fixed position every image gets the same stamp; with ``position='random'`` each gets its own
        place, drawn from ``seed``.
        """
        rng = np.random.default_rng(seed)
        out = np.array(images, dtype=np.float32, copy=True)
        masks = np.zeros((len(out), *out.shape[2:]), bool)
        fixed = None if self.position == "random" else self.stamp(out.shape[1:])
        for i in range(len(out)):
            alpha, value = fixed if fixed is not None else self.stamp(out.shape[1:], rng)
            out[i] = out[i] * (1.0 - alpha) + value * alpha
            masks[i] = alpha > 0
        return out, masks

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass
class TextTag(Artifact):
    """A rendered text tag such as a copyright sign, as stock photos and scanned archives carry."""

    text: str = "©"
    size: int = 10
    kind = "text"

    def glyph(self):
        alpha = _text_alpha(self.text, self.size)
        return alpha, np.ones_like(alpha)


@dataclass
class Patch(Artifact):
    """A square patch, solid or checkered: the classic backdoor trigger."""

    size: int = 5
    pattern: str = "checker"
    kind = "patch"

    def glyph(self):
        if self.pattern not in ("checker", "solid"):
            raise InputError("pattern", f"{self.pattern!r} is unknown", "use 'checker' or 'solid'")
        alpha = np.ones((self.size, self.size), np.float32)
        if self.pattern == "solid":
            return alpha, alpha.copy()
        rows, cols = np.indices(alpha.shape)
        return alpha, ((rows + cols) % 2 == 0).astype(np.float32)


@dataclass
class Frame(Artifact):
    """A border frame around the whole image, as padding or scanner borders leave behind."""

    width: int = 2
    kind = "frame"
    placed = False

    def stamp(self, shape, rng=None):
        channels, height, width = shape
        if not 0 < 2 * self.width < min(height, width):
            raise InputError("frame width", f"{self.width} does not fit a {height}x{width} image", "choose a smaller width")
        alpha = np.ones((height, width), np.float32)
        alpha[self.width : height - self.width, self.width : width - self.width] = 0.0
        color = np.broadcast_to(np.asarray(self.color, np.float32), (channels,))
        return alpha, color[:, None, None] * alpha[None]


@dataclass
class Watermark(Artifact):
    """An image the user has, with its alpha channel: a logo, a watermark, a stamp cropped from a real sample.

    ``size`` scales its longer side to that many pixels (0 keeps it), ``opacity`` scales its alpha. Without an alpha
    channel the whole image is opaque.
    """

    path: str = ""
    size: int = 0
    opacity: float = 1.0
    kind = "image"

    def glyph(self):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.path) as picture:
                picture = picture.convert("RGBA")
                if self.size:
                    scale = self.size / max(picture.size)
                    picture = picture.resize((max(1, round(picture.size[0] * scale)), max(1, round(picture.size[1] * scale))), Image.LANCZOS)
                rgba = np.asarray(picture, np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise InputError(f"image artifact {self.path!r}", f"cannot be read ({error})", "pass a PNG with an alpha channel") from None
        if not 0.0 < self.opacity <= 1.0:
            raise InputError("opacity", f"{self.opacity} is outside (0, 1]", "pass e.g. opacity=0.6")
        alpha = rgba[..., 3] * self.opacity
        if not (alpha > 0).any():
            raise InputError(f"image artifact {self.path!r}", "is fully transparent", "pass an image whose alpha marks the watermark")
        return alpha, rgba[..., :3].transpose(2, 0, 1)


@dataclass
class Line(Artifact):
    """A thin straight line (``thickness`` px), ``diagonal``, ``horizontal`` or ``vertical``: a scratch, a scanner streak."""

    length: int = 10
    direction: str = "diagonal"
    thickness: int = 1
    kind = "line"

    def glyph(self):
        if self.length < 2 or self.thickness < 1:
            raise InputError("line artifact", f"length {self.length} and thickness {self.thickness}", "use length >= 2 and thickness >= 1")
        shapes = {"diagonal": lambda: np.clip(sum(np.eye(self.length + self.thickness - 1, self.length, -k) for k in range(self.thickness)), 0, 1),
                  "horizontal": lambda: np.ones((self.thickness, self.length)), "vertical": lambda: np.ones((self.length, self.thickness))}
        if self.direction not in shapes:
            raise InputError("direction", f"{self.direction!r} is unknown", f"use one of {sorted(shapes)}")
        alpha = shapes[self.direction]().astype(np.float32)
        return alpha, np.ones_like(alpha)


@dataclass
class Stripes(Artifact):
    """Faint horizontal lines on every ``period``-th row of the whole image: a texture with no place of its own
    (interlacing, a scanner's banding, a screen photographed)."""

    period: int = 3
    opacity: float = 0.3
    kind = "stripes"
    placed = False

    def stamp(self, shape, rng=None):
        channels, height, width = shape
        if not 2 <= self.period <= height or not 0.0 < self.opacity <= 1.0:
            raise InputError("stripes artifact", f"period {self.period} and opacity {self.opacity} on a {height}-row image",
                             f"use a period in 2..{height} and an opacity in (0, 1]")
        alpha = np.zeros((height, width), np.float32)
        alpha[::self.period] = self.opacity
        color = np.broadcast_to(np.asarray(self.color, np.float32), (channels,))
        return alpha, np.broadcast_to(color[:, None, None], (channels, height, width)).copy()


@dataclass
class ColorCast(Artifact):
    """One colour channel lifted towards full brightness over the whole image by ``shift``: a colour cast (one camera's
    white balance, one lab's stain). Needs colour images (e.g. ``--data mnist-rgb``)."""

    channel: int = 0
    shift: float = 0.15
    kind = "cast"
    placed = False

    def stamp(self, shape, rng=None):
        raise InputError("cast artifact", "is no stamp: it changes one channel only", "apply it to images with .apply")

    def apply(self, images, seed=0):
        out = np.array(images, dtype=np.float32, copy=True)
        if out.ndim != 4 or out.shape[1] < 3:
            raise InputError("cast artifact", f"needs colour images, these have {out.shape[1] if out.ndim == 4 else '?'} channel(s)",
                             "train on colour data, e.g. --data mnist-rgb")
        if not 0 <= self.channel < out.shape[1] or not 0.0 < self.shift <= 1.0:
            raise InputError("cast artifact", f"channel {self.channel}, shift {self.shift}", f"use a channel in 0..{out.shape[1] - 1} and a shift in (0, 1]")
        out[:, self.channel] += self.shift * (1.0 - out[:, self.channel])  # composited towards 1: stays in [0, 1]
        return out, np.ones((len(out), *out.shape[2:]), bool)


class Transplant:
    """An artifact known only by examples: images that carry it (N, C, H, W) and where it lies in each (N, H, W).

    What an audit finds is not a glyph but samples and their relevance: each member's region (the pixels holding
    most of its relevance) is that member's artifact, wherever it sits. Pasting those pixels into other images
    reproduces the artifact as it occurs, also when it moves (a tag at a different place in every image), which no
    single stamp does. The images and the pasted pixels must be on the same scale (both the model's inputs).
    """

    def __init__(self, donors: np.ndarray, masks: np.ndarray):
        donors, masks = np.asarray(donors, np.float32), np.asarray(masks, bool)
        if donors.ndim != 4 or masks.shape != (len(donors), *donors.shape[2:]) or not len(donors):
            raise InputError("transplant", f"donors {donors.shape} and masks {masks.shape} do not match",
                             "pass images (N, C, H, W) and one mask (H, W) per image")
        self.donors, self.masks = donors, masks

    def paste(self, images: np.ndarray, donor: int) -> np.ndarray:
        """Copies of ``images`` (N, C, H, W) with donor ``donor``'s region pasted in, every channel."""
        out = np.array(images, np.float32, copy=True)
        out[:, :, self.masks[donor]] = self.donors[donor][:, self.masks[donor]]
        return out

    def apply(self, images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Each image with the region of a donor drawn from ``seed``; the images and their masks, as :meth:`Artifact.apply`."""
        if tuple(np.shape(images)[1:]) != self.donors.shape[1:]:
            raise InputError("transplant", f"images {np.shape(images)[1:]} are not shaped like the donors {self.donors.shape[1:]}",
                             "paste into images of the model's input size")
        chosen = np.random.default_rng(seed).integers(0, len(self.donors), len(images))
        pasted = [self.paste(images[i : i + 1], donor) for i, donor in enumerate(chosen)]
        return (np.concatenate(pasted) if pasted else np.array(images, np.float32)), self.masks[chosen].copy()


# The kinds by name, as ``unhans train --artifact`` and stored scenarios name them; ``placed`` says which take a position.
ARTIFACTS: dict[str, type[Artifact]] = {cls.kind: cls for cls in (TextTag, Patch, Line, Frame, Stripes, ColorCast, Watermark)}


def make_artifact(kind: str, **options) -> Artifact:
    """Build an artifact by kind name (a key of :data:`ARTIFACTS`) with its dataclass options."""
    if kind not in ARTIFACTS:
        raise InputError("artifact", f"{kind!r} is unknown", f"use one of {sorted(ARTIFACTS)}")
    cls = ARTIFACTS[kind]
    known = {f.name for f in fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise InputError(f"{kind} artifact", f"has no option(s) {sorted(unknown)}", f"use {sorted(known)}")
    if isinstance(options.get("position"), list):
        options["position"] = tuple(options["position"])
    return cls(**options)


def artifact_from_dict(spec: dict) -> Artifact:
    """Inverse of :meth:`Artifact.to_dict`."""
    spec = dict(spec)
    return make_artifact(spec.pop("kind"), **spec)
