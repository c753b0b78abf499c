import numpy as np
import pytest
from PIL import Image

from unhans.core.data import ImageDataset, load_dataset, load_image_folder, load_npz, save_npz, stratified_split
from unhans.core.errors import InputError


def test_mnist5k_is_real_and_balanced(mnist):
    assert mnist.images.shape == (5000, 1, 28, 28)
    assert mnist.images.dtype == np.float32 and mnist.images.min() == 0 and mnist.images.max() == 1
    assert np.bincount(mnist.labels).tolist() == [500] * 10
    # real digits: strokes cover a minority of pixels, the border is background
    ink = (mnist.images > 0.5).mean()
    assert 0.05 < ink < 0.25
    assert mnist.images[:, :, 0, :].max() < 0.5


def test_digits(digits):
    assert digits.images.shape == (1797, 1, 8, 8)
    assert digits.num_classes == 10 and 0 <= digits.images.min() and digits.images.max() <= 1


def test_stratified_split_is_deterministic_and_stratified(mnist):
    train_a, test_a = stratified_split(mnist, 0.2, seed=3)
    train_b, test_b = stratified_split(mnist, 0.2, seed=3)
    _, test_c = stratified_split(mnist, 0.2, seed=4)
    assert np.array_equal(test_a.images, test_b.images)
    assert not np.array_equal(test_a.images, test_c.images)
    assert len(train_a) == 4000 and len(test_a) == 1000
    assert np.bincount(test_a.labels).tolist() == [100] * 10
    with pytest.raises(InputError, match="test_fraction"):
        stratified_split(mnist, 1.0)


def test_npz_round_trip(tmp_path, digits):
    path = tmp_path / "d.npz"
    save_npz(path, digits)
    back = load_npz(path)
    assert np.array_equal(back.images, digits.images) and np.array_equal(back.labels, digits.labels)
    assert back.classes == digits.classes


def test_npz_channels_last_uint8(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", x=images, y=np.array([0, 1, 2, 0, 1, 2]))
    back = load_dataset(tmp_path / "x.npz")
    assert back.images.shape == (6, 3, 5, 5)
    assert np.allclose(back.images[1, 2], images[1, :, :, 2] / 255)


@pytest.mark.parametrize("arrays, problem", [
    ({"pics": np.zeros((2, 4, 4))}, "save the images as 'images'"),
    ({"images": np.zeros((2, 4, 4)), "labels": np.array([0.5, 1.0])}, "integer label"),
    ({"images": np.full((2, 4, 4), 3.0), "labels": np.array([0, 1])}, "scaled to"),
    ({"images": np.full((2, 4, 4), np.nan), "labels": np.array([0, 1])}, "NaN"),
    ({"images": np.zeros((3, 4, 4)), "labels": np.array([0, 1])}, "one label per image"),
])
def test_bad_npz_names_file_and_fix(tmp_path, arrays, problem):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=problem) as error:
        load_npz(path)
    assert str(path) in str(error.value)


def _write_folder(root, sizes=((8, 8),) * 3, mode="L"):
    rng = np.random.default_rng(0)
    expected = []
    for label, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            shape = (h, w) if mode == "L" else (h, w, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i}.png")
            expected.append((label, pixels))
    return expected


def test_image_folder_grey_and_rgb(tmp_path):
    expected = _write_folder(tmp_path / "grey")
    data = load_image_folder(tmp_path / "grey")
    assert data.classes == ["cat", "dog"] and data.images.shape == (6, 1, 8, 8)
    assert np.array_equal(data.labels, [label for label, _ in expected])
    assert np.allclose(data.images[4, 0], expected[4][1] / 255)
    _write_folder(tmp_path / "rgb", mode="RGB")
    assert load_image_folder(tmp_path / "rgb").images.shape == (6, 3, 8, 8)


def test_image_folder_mixed_sizes_and_unreadable(tmp_path):
    _write_folder(tmp_path, sizes=((8, 8), (8, 8), (9, 8)))
    with pytest.raises(InputError, match="resize all images to one size"):
        load_image_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png"):
        load_image_folder(tmp_path)
    lenient = load_image_folder(tmp_path, skip_unreadable=True)
    assert len(lenient) == 4 and len(lenient.skipped) == 3  # two odd sizes, one broken file
    assert any("broken.png: unreadable" in s for s in lenient.skipped)


def test_unknown_path_and_class():
    with pytest.raises(InputError, match="does not exist; pass one of"):
        load_dataset("/no/such/folder")
    data = ImageDataset(np.zeros((2, 1, 4, 4)), [0, 1], ["a", "b"])
    assert data.class_index("b") == 1 and data.class_index("0") == 0
    with pytest.raises(InputError, match="class 'c' does not exist"):
        data.class_index("c")
