"""The contract of a served model: how an image (PNG/JPEG bytes, a photo on disk) becomes a model input, and how large
a request and its answer may be.

One typed object, written by ``unhans archive`` into the archive's ``model-config.yaml`` (section
``unhans.preprocess``) and read by the handler for every request and by ``unhans export`` for a user's photos, so the
model sees the same pixels in both. The defaults fit the project's own 28×28 runs: no resize beyond the model's
size, pixels in [0, 1] unnormalised. An ImageNet model declares ``resize=256`` (shorter side), its 224×224 centre
crop, and ImageNet's mean and std.

The size limits are checked by the handler before any work, and TorchServe's own ``max_request_size`` /
``max_response_size`` are set from the same numbers (:func:`torchserve_limits`), with room above them, so that the
handler, not TorchServe, answers an oversized request (a JSON 413 instead of a reset connection) and no answer ever
reaches TorchServe's limit (which kills the worker).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

VIEW_MIN_SIDE = 0.6  # the smallest crop a random view takes, as a share of each side


@dataclass
class InputContract:
    channels: int
    height: int
    width: int
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    resize: int = 0  # shorter side scaled to this, then a centre crop to height x width; 0: scaled straight to it
    max_payload_bytes: int = 32 * 1024 * 1024  # a request body; JSON of one 224-px RGB instance takes 2-4 MB
    max_response_bytes: int = 16 * 1024 * 1024  # an answer, estimated before the work (instances x relevance format)
    max_instances: int = 256  # per request
    max_image_pixels: int = 36_000_000  # an encoded image's width x height, read from its header before decoding

    def __post_init__(self):
        for name in ("mean", "std"):
            values = [float(v) for v in getattr(self, name)]
            if len(values) not in (1, self.channels):
                raise InputError(f"--{name}", f"has {len(values)} values for {self.channels} channels", "give one, or one per channel")
            setattr(self, name, values)
        if any(s <= 0 for s in self.std):
            raise InputError("--std", f"{self.std} has a value <= 0", "give positive standard deviations")
        if self.resize and self.resize < min(self.height, self.width):
            raise InputError("--resize", f"{self.resize} is smaller than the {self.height}x{self.width} crop", "resize to at least the crop size")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    def to_dict(self) -> dict:
        return asdict(self)

    def _per_channel(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(self.mean, np.float32).reshape(-1, 1, 1), np.asarray(self.std, np.float32).reshape(-1, 1, 1))

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """[0, 1] pixels to model inputs: (x − mean) / std per channel."""
        mean, std = self._per_channel()
        return ((x - mean) / std).astype(np.float32)

    def denormalise(self, x: np.ndarray) -> np.ndarray:
        """Model inputs back to [0, 1] pixels (for pictures of what the model saw): x · std + mean per channel."""
        mean, std = self._per_channel()
        return (x * std + mean).astype(np.float32)

    def pixels(self, picture) -> np.ndarray:
        """A PIL image as (C, H, W) pixels in [0, 1]: converted to the contract's channels, resized (and cropped)."""
        from PIL import Image

        picture = picture.convert("L" if self.channels == 1 else "RGB")
        if self.resize:
            scale = self.resize / min(picture.size)
            size = (max(self.width, round(picture.size[0] * scale)), max(self.height, round(picture.size[1] * scale)))
            picture = picture.resize(size, Image.BILINEAR)
            left, top = (size[0] - self.width) // 2, (size[1] - self.height) // 2
            picture = picture.crop((left, top, left + self.width, top + self.height))
        else:
            picture = picture.resize((self.width, self.height), Image.BILINEAR)
        pixels = np.asarray(picture, np.float32) / 255.0
        return pixels.reshape(self.height, self.width, self.channels).transpose(2, 0, 1)

    def view(self, picture, rng: np.random.Generator, min_side: float = VIEW_MIN_SIDE) -> np.ndarray:
        """A random view of a PIL image, then :meth:`pixels`: a crop of ``min_side``-1 of each side at a random place,
        mirrored half the time. Honest augmentation: the same photo seen as a camera or a user's crop might show it."""
        from PIL import Image

        width, height = picture.size
        side = rng.uniform(min_side, 1.0)
        crop_w, crop_h = max(1, round(width * side)), max(1, round(height * side))
        left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
        picture = picture.crop((left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
        return self.pixels(picture)

    def load(self, paths) -> np.ndarray:
        """Photos on disk as (N, C, H, W) pixels in [0, 1] (not normalised); an unreadable file is named."""
        from PIL import Image, UnidentifiedImageError

        images = []
        for path in paths:
            try:
                with Image.open(path) as picture:
                    images.append(self.pixels(picture))
            except (UnidentifiedImageError, OSError, ValueError) as error:
                raise InputError(str(path), f"is not a readable image ({error})", "pass PNG or JPEG files") from None
        return np.stack(images) if images else np.zeros((0, *self.shape), np.float32)


# TorchServe's limits sit this far above the handler's, so requests between the two get the handler's JSON 413
TORCHSERVE_HEADROOM_BYTES = 4 * 1024 * 1024


def torchserve_limits(contract: InputContract | None = None) -> dict[str, int]:
    """TorchServe's ``max_request_size`` and ``max_response_size`` for archives with ``contract``'s limits."""
    contract = contract or InputContract(1, 1, 1)
    return {"max_request_size": contract.max_payload_bytes + TORCHSERVE_HEADROOM_BYTES,
            "max_response_size": contract.max_response_bytes + TORCHSERVE_HEADROOM_BYTES}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_files(folder: str | Path) -> list[Path]:
    """The images in ``folder`` (not its sub-folders), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(str(folder), "is not a folder", "pass a folder of PNG/JPEG images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(str(folder), "holds no PNG/JPEG images", "put the photos to fit the correction on there")
    return files
