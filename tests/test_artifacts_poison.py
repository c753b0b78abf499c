import numpy as np
import pytest

from unhans.core.artifacts import ARTIFACTS, ColorCast, Frame, Line, Patch, Stripes, TextTag, artifact_from_dict, make_artifact
from unhans.core.data import stratified_split
from unhans.core.errors import InputError
from unhans.core.poison import attacked, load_scenario, poison, save_scenario


@pytest.mark.parametrize("artifact", [
    TextTag(), TextTag(text="WM", size=8, position="top-left"), Patch(), Patch(pattern="solid", position=(3, 4)),
    Patch(size=3, position="center", color=0.3), Frame(), Frame(width=1, color=(0.2, 0.9, 0.5)),
    Line(), Line(direction="vertical", thickness=2, position="top-left"), Stripes(), Stripes(period=4, opacity=1.0), ColorCast(channel=1),
])
def test_mask_equals_the_pixels_the_artifact_changed(artifact):
    # random continuous images: every pixel the artifact writes to changes, no other does
    images = np.random.default_rng(1).uniform(0.01, 0.99, (5, 3, 28, 28)).astype(np.float32)
    out, masks = artifact.apply(images)
    changed = (out != images).any(axis=1)
    assert masks.any() and np.array_equal(changed, masks)
    assert np.array_equal(out[:, :, ~masks[0]], images[:, :, ~masks[0]])


def test_mask_shapes_and_positions():
    blank = np.zeros((1, 1, 28, 28), np.float32)
    _, tl = Patch(position="top-left").apply(blank)
    _, br = Patch(position="bottom-right").apply(blank)
    assert tl[0, 1:6, 1:6].all() and tl.sum() == 25
    assert br[0, 22:27, 22:27].all() and br.sum() == 25
    _, text = TextTag().apply(blank)
    rows, cols = np.nonzero(text[0])
    assert rows.min() > 14 and cols.min() > 14  # a small © in the bottom-right corner
    _, frame = Frame(width=2).apply(blank)
    assert frame.sum() == 28 * 28 - 24 * 24


def test_random_position_moves_per_image_and_is_seeded():
    images = np.zeros((20, 1, 28, 28), np.float32)
    _, masks_a = Patch(position="random").apply(images, seed=5)
    _, masks_b = Patch(position="random").apply(images, seed=5)
    assert np.array_equal(masks_a, masks_b)
    assert len({m.tobytes() for m in masks_a}) > 10
    assert (masks_a.sum(axis=(1, 2)) == 25).all()


def test_artifacts_without_a_place_cover_the_image():
    blank = np.zeros((1, 3, 28, 28), np.float32)
    striped, stripes = Stripes(period=3, opacity=0.3).apply(blank)
    assert stripes[0, ::3].all() and not stripes[0, 1::3].any() and np.allclose(striped[0, :, ::3], 0.3)
    cast, everywhere = ColorCast(channel=0, shift=0.15).apply(blank)
    assert everywhere.all() and np.allclose(cast[0, 0], 0.15) and not cast[0, 1:].any()  # one channel only
    _, line = Line(length=10).apply(blank[:, :1])
    rows, cols = np.nonzero(line[0])
    assert len(rows) == 10 and (np.diff(rows) == 1).all() and (np.diff(cols) == 1).all()  # a 1-px diagonal
    assert not any(ARTIFACTS[kind].placed for kind in ("frame", "stripes", "cast")) and ARTIFACTS["line"].placed
    with pytest.raises(InputError, match="needs colour images.*mnist-rgb"):
        ColorCast().apply(blank[:, :1])


def test_artifact_errors_and_round_trip():
    with pytest.raises(InputError, match="larger than the 8x8 image"):
        Patch(size=9).apply(np.zeros((1, 1, 8, 8)))
    with pytest.raises(InputError, match="with margin 1"):
        Patch(size=8).apply(np.zeros((1, 1, 8, 8)))  # a named place keeps its margin
    _, whole = Patch(size=8, position=(0, 0)).apply(np.zeros((1, 1, 8, 8)))  # a given place does not: the audit's frame region
    assert whole.all()
    with pytest.raises(InputError, match="position"):
        Patch(position="left-ish").apply(np.zeros((1, 1, 8, 8)))
    with pytest.raises(InputError, match="use one of"):
        make_artifact("sticker")
    with pytest.raises(InputError, match="has no option"):
        make_artifact("patch", radius=3)
    for kind in ARTIFACTS:
        artifact = make_artifact(kind, position=[2, 3]) if kind != "frame" else make_artifact(kind)
        assert artifact_from_dict(artifact.to_dict()) == artifact


def test_backdoor_bookkeeping(mnist):
    train, _ = stratified_split(mnist, 0.2, seed=0)
    poisoned = poison(train, Patch(), target=0, fraction=0.1, mode="backdoor", seed=0)
    per_class = np.bincount(poisoned.original_labels[poisoned.has_artifact], minlength=10)
    assert per_class[0] == 0 and (per_class[1:] == 40).all()
    assert (poisoned.labels[poisoned.has_artifact] == 0).all()
    assert np.array_equal(poisoned.labels[~poisoned.has_artifact], train.labels[~poisoned.has_artifact])
    assert np.array_equal(poisoned.original_labels, train.labels)
    assert np.array_equal(poisoned.masks.any(axis=(1, 2)), poisoned.has_artifact)
    assert np.array_equal(poisoned.images[~poisoned.has_artifact], train.images[~poisoned.has_artifact])
    changed = (poisoned.images != train.images).any(axis=1)
    assert not (changed & ~poisoned.masks).any()  # nothing changed outside the recorded masks
    # 360 of the 760 class-0 samples carry the artifact, as in the feasibility run of NOTES.md
    assert (poisoned.labels == 0).sum() == 760
    again = poison(train, Patch(), target=0, fraction=0.1, mode="backdoor", seed=0)
    assert np.array_equal(again.has_artifact, poisoned.has_artifact)


def test_cooccurrence_bookkeeping(mnist):
    poisoned = poison(mnist, TextTag(), target=3, fraction=0.3, mode="cooccurrence", seed=1)
    assert np.array_equal(poisoned.labels, mnist.labels)
    assert (mnist.labels[poisoned.has_artifact] == 3).all() and poisoned.has_artifact.sum() == 150


def test_poison_rejects_bad_arguments(digits):
    with pytest.raises(InputError, match=r"fraction: 1.5 is outside \[0, 1\]"):
        poison(digits, Patch(size=3), target=0, fraction=1.5)
    with pytest.raises(InputError, match="target: class 10 does not exist"):
        poison(digits, Patch(size=3), target=10, fraction=0.1)
    with pytest.raises(InputError, match="mode"):
        poison(digits, Patch(size=3), target=0, fraction=0.1, mode="sneaky")


def test_scenario_round_trip(tmp_path, digits):
    train, test = stratified_split(digits, 0.25, seed=0)
    artifact = TextTag(text="x", size=4)
    poisoned = poison(train, artifact, 2, 0.2, "backdoor", 0)
    attack = attacked(test, artifact, 2)
    assert (attack.original_labels != 2).all() and attack.has_artifact.all()
    save_scenario(tmp_path / "s.npz", poisoned, test, attack, artifact)
    train_b, test_b, attack_b, artifact_b = load_scenario(tmp_path / "s.npz")
    assert artifact_b == artifact and train_b.target == 2 and train_b.mode == "backdoor"
    for a, b in [(poisoned.images, train_b.images), (poisoned.has_artifact, train_b.has_artifact),
                 (poisoned.masks, train_b.masks), (poisoned.original_labels, train_b.original_labels),
                 (test.labels, test_b.labels), (attack.images, attack_b.images), (attack.masks, attack_b.masks)]:
        assert np.array_equal(a, b)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_cut_region_pasted_as_a_watermark_reproduces_the_artifact(tmp_path, channels):
    """The audit's artifact region (audit/region.py: members' median under a mask, an RGBA PNG + position) pasted by
    Watermark writes the artifact's pixels exactly where it was, in grey and colour images alike."""
    from unhans.audit.region import cut_region, region_mask
    from unhans.core.artifacts import Watermark

    rng = np.random.default_rng(0)
    patch = Patch(size=4, position=(17, 3), color=(0.2, 0.6, 1.0)[:channels] if channels == 3 else 0.6)
    members, masks = patch.apply(rng.integers(0, 256, (9, channels, 28, 28)).astype(np.float32) / 255)
    region = cut_region(members, masks[0])
    assert region.position == (17, 3) and region.box[2:] == (4, 4)
    png = region.save(tmp_path / "region.png")
    clean = rng.integers(0, 256, (5, channels, 28, 28)).astype(np.float32) / 255
    pasted, pasted_masks = Watermark(path=str(png), position=region.position).apply(clean)
    expected, _ = patch.apply(clean)
    assert np.array_equal(pasted_masks, np.broadcast_to(masks[0], pasted_masks.shape))
    assert np.abs(pasted - expected).max() <= 0.5 / 255 + 1e-6  # 8-bit PNG
    # the rule's thresholds: a blurred blob's edges are kept, a weak bump elsewhere is not
    contrast = np.zeros((28, 28))
    contrast[10:15, 10:15] = 1.0
    contrast[[10, 10, 14, 14], [10, 14, 10, 14]] = 0.3  # corners blurred below half of the peak
    contrast[2, 2] = 0.4  # above a quarter, but never reaching half: noise
    found = region_mask(contrast)
    assert found[10:15, 10:15].all() and found.sum() == 25
