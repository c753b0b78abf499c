import numpy as np
import pytest
import torch

from unhans.core.attribution import LRP, relevance_share
from unhans.core.cav import CAV
from unhans.core.clarc import PClArC, aclarc, fit_cav, pclarc
from unhans.core.errors import InputError
from unhans.core.layers import activations
from unhans.core.training import attack_success, clean_accuracy

LAYER = "features.pool2"


@pytest.fixture(scope="module")
def fitted(backdoored_vgg):
    train = backdoored_vgg["train"]
    cav = fit_cav(backdoored_vgg["model"], LAYER, train.images[train.has_artifact], train.images[~train.has_artifact])
    return cav


def test_projection_is_rank_one_and_removes_the_direction():
    rng = np.random.default_rng(0)
    v = rng.normal(size=48).astype(np.float32)
    v /= np.linalg.norm(v)
    z = rng.normal(size=(3, 4, 4)).astype(np.float32)
    h = torch.from_numpy(rng.normal(size=(5, 3, 4, 4)).astype(np.float32))
    out = PClArC(v, z, "flat")(h)
    delta = (out - h).flatten(1).numpy()
    assert np.abs((out.flatten(1).numpy() - z.ravel()) @ v).max() < 1e-5  # vᵀ(h' − z) = 0
    assert np.linalg.matrix_rank(np.c_[delta.T, v], tol=1e-4) == 1  # every change is along v
    c = rng.normal(size=3).astype(np.float32)
    c /= np.linalg.norm(c)
    out = PClArC(c, z, "channel")(h)
    per_position = torch.einsum("nchw,c->nhw", out - torch.from_numpy(z), torch.from_numpy(c))
    assert per_position.abs().max() < 1e-5
    with pytest.raises(InputError, match="fit the CAV on the layer"):
        PClArC(v, z)(torch.zeros(2, 3, 5, 5))


def test_pattern_cav_removes_the_backdoor(backdoored_vgg, fitted):
    model, test, attack = backdoored_vgg["model"], backdoored_vgg["test"], backdoored_vgg["attack"]
    before_clean, before_attack = clean_accuracy(model, test), attack_success(model, attack, 0)
    corrected = pclarc(model, LAYER, fitted)
    assert attack_success(corrected, attack, 0) <= 0.1 * before_attack
    assert clean_accuracy(corrected, test) >= before_clean - 0.01
    # the correction sits inside the model: relevance of the corrected model leaves the artifact
    relevance_before = LRP(model).explain(attack.images[:300], target=0).relevance
    relevance_after = LRP(corrected).explain(attack.images[:300], target=0).relevance
    masks = attack.masks[:300]
    assert relevance_share(relevance_after, masks) < 0.5 * relevance_share(relevance_before, masks)


def test_reactive_gate_spares_clean_inputs(backdoored_vgg, fitted):
    model, test, attack = backdoored_vgg["model"], backdoored_vgg["test"], backdoored_vgg["attack"]
    h_clean, h_attack = activations(model, test.images, LAYER), activations(model, attack.images, LAYER)
    assert (fitted.decision_function(h_attack) > 0).mean() > 0.95
    assert (fitted.decision_function(h_clean) > 0).mean() < 0.05
    module = PClArC.from_cav(fitted, reactive=True)
    quiet = module.gate(torch.from_numpy(h_clean)) == 0
    assert torch.equal(module(torch.from_numpy(h_clean))[quiet], torch.from_numpy(h_clean)[quiet])
    reactive = pclarc(model, LAYER, fitted, reactive=True)
    assert clean_accuracy(reactive, test) >= clean_accuracy(model, test) - 0.003
    assert attack_success(reactive, attack, 0) <= 0.1


def test_paired_and_channel_cavs(backdoored_vgg):
    model, train, artifact = backdoored_vgg["model"], backdoored_vgg["train"], backdoored_vgg["artifact"]
    clean = train.images[~train.has_artifact][:500]
    with_artifact, _ = artifact.apply(clean)
    paired = fit_cav(model, LAYER, with_artifact, clean, paired=True)
    pattern = fit_cav(model, LAYER, train.images[train.has_artifact], train.images[~train.has_artifact])
    assert float(paired.direction_ @ pattern.direction_) > 0.7
    channel = fit_cav(model, LAYER, with_artifact, clean, mode="channel")
    assert channel.direction_.shape == (64,) and channel.clean_mean_.shape == (64, 7, 7)
    corrected = pclarc(model, LAYER, channel)
    assert corrected(torch.from_numpy(clean[:4])).shape == (4, 10)


def test_cav_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="take both from the same layer"):
        CAV().fit(rng.normal(size=(5, 8)), rng.normal(size=(5, 9)))
    with pytest.raises(InputError, match="at least 2"):
        CAV().fit(rng.normal(size=(1, 8)), rng.normal(size=(5, 8)))
    with pytest.raises(InputError, match="NaN"):
        CAV().fit(np.full((3, 8), np.nan), rng.normal(size=(5, 8)))
    with pytest.raises(InputError, match="method"):
        CAV(method="median").fit(rng.normal(size=(5, 8)), rng.normal(size=(5, 8)))
    cav = CAV().fit(rng.normal(size=(20, 8)) + 1, rng.normal(size=(20, 8)))
    with pytest.raises(InputError, match="does not match the CAV"):
        cav.decision_function(rng.normal(size=(3, 7)))
    with pytest.raises(InputError, match=r"valid layers: \['0'\]"):
        pclarc(torch.nn.Sequential(torch.nn.Linear(8, 2)), "1", cav)


def test_aclarc_finetuning_unlearns_the_artifact(backdoored_vgg):
    model, train, test, attack = (backdoored_vgg[k] for k in ("model", "train", "test", "attack"))
    subset = train.subset(np.arange(0, len(train), 2))
    tuned = aclarc(model, subset, backdoored_vgg["artifact"], fraction=0.5, epochs=1, show_progress=False)
    assert attack_success(tuned, attack, 0) < 0.5 * attack_success(model, attack, 0)
    assert clean_accuracy(tuned, test) > 0.9
    assert attack_success(model, attack, 0) > 0.9  # the original is untouched


def test_cav_reports_its_held_out_detection_and_warns():
    from unhans.core.cav import CAV

    rng = np.random.default_rng(0)
    clean = rng.normal(size=(40, 8, 2, 2))
    shift = np.zeros((8, 2, 2))
    shift[3, 1, 1] = 6.0
    paired = CAV().fit_paired(clean + shift, clean)
    assert paired.quality_["heldout_detection_acc"] >= 0.95 and paired.quality_["paired"] and not paired.quality_["warnings"]
    # artifact samples that carry nothing the clean ones lack: the detector cannot find it in held-out samples
    unrelated = CAV().fit(rng.normal(size=(40, 8, 2, 2)), clean)
    assert unrelated.quality_["heldout_detection_acc"] < 0.8
    assert any("held-out" in w for w in unrelated.quality_["warnings"]) and any("paired" in w for w in unrelated.quality_["warnings"])
    # ten pairs for 3,200 dimensions (a CAV at a large layer from a handful of photos)
    few = CAV().fit_paired(rng.normal(size=(10, 200, 4, 4)) + 1.0, rng.normal(size=(10, 200, 4, 4)))
    assert any("20 samples for 3200 dimensions" in w for w in few.quality_["warnings"])
