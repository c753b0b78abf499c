import copy

import numpy as np
import pytest
import torch
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

from unhans.core.attribution import LRP, relevance_share
from unhans.core.errors import InputError


def test_relevance_equals_zennits_own_attributor(backdoored_vgg):
    model, images = backdoored_vgg["model"], backdoored_vgg["test"].images[:64]
    explanation = LRP(model).explain(images, batch_size=20)
    x = torch.from_numpy(images).requires_grad_(True)
    with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])) as attributor:
        logits = model(x).detach()
        _, reference = attributor(x, torch.eye(10)[logits.argmax(1)])
    assert np.abs(explanation.relevance - reference.numpy()).max() < 1e-6
    assert np.array_equal(explanation.targets, logits.argmax(1).numpy())


def test_conservation(backdoored_vgg):
    """LRP conserves the target's relevance: exactly through z+ and epsilon layers when biases are zero."""
    model, images = backdoored_vgg["model"], backdoored_vgg["test"].images[:100]
    sums = LRP(model).explain(images).relevance.sum(axis=(1, 2, 3))
    assert ((sums > 0.85) & (sums < 1.0 + 1e-4)).all()  # biases and the first layer's padding absorb a little
    unbiased = type(model)()
    unbiased.load_state_dict(model.state_dict())
    for module in unbiased.modules():
        if getattr(module, "bias", None) is not None:
            torch.nn.init.zeros_(module.bias)
    explanation = LRP(unbiased, layers=["features.pool2", "features.relu1"]).explain(images, target=4)
    for layer in ("features.pool2", "features.relu1"):
        total = explanation.layer_relevance[layer].reshape(len(images), -1).sum(1)
        assert np.allclose(total, 1.0, atol=1e-3), layer  # float32 and the 1e-6 stabiliser


def test_targets_predicted_single_and_per_row(backdoored_vgg):
    model, images = backdoored_vgg["model"], backdoored_vgg["test"].images[:30]
    lrp = LRP(model)
    per_row = np.arange(30) % 10
    rows = lrp.explain(images, target=per_row, batch_size=7)
    assert np.array_equal(rows.targets, per_row)
    single = lrp.explain(images, target=3)
    assert (single.targets == 3).all()
    same = lrp.explain(images[per_row == 3], target=3)
    assert np.allclose(rows.relevance[per_row == 3], same.relevance, atol=1e-6)
    with pytest.raises(InputError, match="one target, or one per row"):
        lrp.explain(images, target=[1, 2])
    with pytest.raises(InputError, match="out of range"):
        lrp.explain(images, target=10)


def test_layer_relevance_and_activations(backdoored_vgg):
    model, images = backdoored_vgg["model"], backdoored_vgg["test"].images[:16]
    explanation = LRP(model, layers=["features.pool2"]).explain(images)
    assert explanation.layer_activations["features.pool2"].shape == (16, 64, 7, 7)
    assert explanation.layer_relevance["features.pool2"].shape == (16, 64, 7, 7)
    assert np.allclose(explanation.logits, model(torch.from_numpy(images)).detach().numpy(), atol=1e-5)
    with pytest.raises(InputError, match="did you mean"):
        LRP(model, layers=["features.pool3"])


def test_resnet_canonized_and_gamma_box(digits_resnet):
    model, test = digits_resnet
    images = test.images[:50]
    for composite in ("epsilon_plus_flat", "EpsilonGammaBox"):
        with LRP(model, composite, layers=["features.layer3"]) as lrp:
            explanation = lrp.explain(images)
        # BatchNorm merged into the convolutions: the canonized copy computes the same function
        assert np.allclose(explanation.logits, model(torch.from_numpy(images)).detach().numpy(), atol=1e-3)
        assert np.isfinite(explanation.relevance).all() and np.abs(explanation.relevance).sum() > 0
    assert not any(hasattr(m, "canonizer_sum") for m in model.modules())  # the original stays untouched
    # where zennit's own canonizer knows the blocks (torchvision's BasicBlock), bias-free relevance shows what the
    # trace-based canonizer and the z+ fallback add: zennit's ZPlus drops relevance at the unrectified shortcut convs
    unbiased = copy.deepcopy(model)
    for module in unbiased.modules():
        for name in ("bias", "running_mean"):
            if getattr(module, name, None) is not None:
                torch.nn.init.zeros_(getattr(module, name))
    x = torch.from_numpy(images).double().requires_grad_(True)
    unbiased.double()
    with Gradient(model=unbiased, composite=EpsilonPlusFlat(canonizers=[ResNetCanonizer()], epsilon=1e-100, stabilizer=1e-100)) as attributor:
        _, reference = attributor(x, torch.eye(10).double()[unbiased(x).argmax(1)])
    zennit_sums = reference.reshape(len(images), -1).sum(1).numpy()
    lrp = LRP(model)
    lrp.check(torch.from_numpy(images))
    assert lrp.conservation.rel_err < 1e-9 < np.abs(zennit_sums - 1).max()
    with pytest.raises(InputError, match="composite"):
        LRP(model, "alpha_beta")


def test_bad_images():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    images = np.zeros((3, 1, 2, 2), np.float32)
    images[1, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"rows \[1\] contain NaN"):
        LRP(model).explain(images)


def test_backdoored_model_looks_at_the_artifact(backdoored_vgg):
    attack = backdoored_vgg["attack"]
    relevance = LRP(backdoored_vgg["model"]).explain(attack.images[:200], target=0).relevance
    # the 5x5 tag covers 3% of the pixels yet draws most of the relevance for the backdoor class
    assert attack.masks[:200].mean() < 0.04
    assert relevance_share(relevance, attack.masks[:200]) > 0.3
