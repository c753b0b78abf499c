import io

import numpy as np
import pytest
import torch

from unhans.core.attribution import LRP, relevance_share
from unhans.core.cav import CAV
from unhans.core.artifacts import Transplant
from unhans.core.clarc import PClArC, aclarc, fit_cav, pclarc
from unhans.core.errors import InputError
from unhans.core.layers import activations
from unhans.core.training import attack_success, clean_accuracy
from unhans.export.correction import Correction

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


def test_aclarc_unlearns_an_artifact_known_only_by_its_samples(backdoored_vgg):
    """The audit's route for an artifact that moves: each sample's own region pasted into images of every class, the
    samples themselves left out (labelled 0, they would teach the backdoor again)."""
    model, train, test, attack = (backdoored_vgg[k] for k in ("model", "train", "test", "attack"))
    rows = np.flatnonzero(train.has_artifact)
    tuned = aclarc(model, train, Transplant(train.images[rows], train.masks[rows]), show_progress=False, exclude=rows)
    assert attack_success(tuned, attack, 0) < 0.1 * attack_success(model, attack, 0)
    assert clean_accuracy(tuned, test) >= clean_accuracy(model, test) - 0.01


def test_transplant_pastes_each_donors_own_pixels_and_nothing_else():
    rng = np.random.default_rng(0)
    donors, images = rng.random((3, 2, 6, 6), dtype=np.float32), np.zeros((5, 2, 6, 6), np.float32)
    masks = np.zeros((3, 6, 6), bool)
    masks[0, 0, 0], masks[1, 2:4, 2:4], masks[2, 5, :] = True, True, True  # a different place in each donor
    transplant = Transplant(donors, masks)
    pasted, where = transplant.apply(images, seed=1)
    assert where.shape == (5, 6, 6) and not images.any()  # the caller's images are untouched
    for image, mask in zip(pasted, where):
        donor = next(d for d in range(3) if (masks[d] == mask).all())
        assert np.array_equal(image[:, mask], donors[donor][:, mask]) and not image[:, ~mask].any()
    assert np.array_equal(transplant.paste(images[:2], 1)[:, :, masks[1]], np.broadcast_to(donors[1][:, masks[1]], (2, 2, 4)))
    with pytest.raises(InputError, match="do not match"):
        Transplant(donors, masks[:, :5])
    with pytest.raises(InputError, match="not shaped like the donors"):
        transplant.apply(np.zeros((1, 2, 5, 5), np.float32))


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


def _subspace_pairs(rng, n, basis, shape=(8, 3, 3)):
    """Clean activations and the same with an artifact whose effect varies over the rows of ``basis`` (k, D)."""
    clean = rng.normal(size=(n, *shape))
    coefficients = rng.normal(size=(n, len(basis))) * 3.0 + np.r_[2.0, np.zeros(len(basis) - 1)]
    return clean + (coefficients @ basis).reshape(n, *shape), clean


def test_rank_k_removes_a_k_dimensional_artifact_that_rank_one_does_not():
    """An artifact that moves activations along 3 directions: one CAV direction leaves most of it, 3 remove it, also
    from pairs the subspace was not fitted on; 'auto' finds k = 3. Channel mode: the same per position."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(72, 3)))[0].T
    dirty, clean = _subspace_pairs(rng, 40, basis)
    held_dirty, held_clean = _subspace_pairs(rng, 20, basis)

    def left(cav):  # what the correction leaves of the artifact in held-out pairs
        module = PClArC.from_cav(cav)
        out = [module(torch.tensor(h, dtype=torch.float32)).numpy() for h in (held_dirty, held_clean)]
        return float(np.abs(out[0] - out[1]).max() / np.abs(held_dirty - held_clean).max())

    one, three, auto = (CAV(n_directions=k).fit_paired(dirty, clean) for k in (1, 3, "auto"))
    assert left(one) > 0.5 and left(three) < 1e-5
    assert auto.directions_.shape == (3, 72) and np.allclose(auto.directions_ @ auto.directions_.T, np.eye(3), atol=1e-5)
    assert np.allclose(three.directions_[0], one.direction_) and np.allclose(three.direction_, one.direction_)  # the CAV first
    assert one.quality_["energy_share"] < 0.8 and three.quality_["energy_share"] > 0.999
    assert three.quality_["heldout_energy_share"] > 0.999 and three.quality_["directions"] == 3
    assert not any("directions 2-3" in w for w in three.quality_["warnings"])
    # 6 directions from 12 pairs whose differences are noise beyond a shared shift: they fit those pairs, the report says so
    base = rng.normal(size=(12, 2000))
    noise = CAV(n_directions=6).fit_paired(base + rng.normal(size=base.shape) + 0.3, base)
    assert any("they fit these pairs" in w for w in noise.quality_["warnings"])
    assert three.fingerprint() != one.fingerprint()
    # channel mode: a 2-dimensional artifact in channel space, at every position with its own strength
    channel_basis = np.linalg.qr(rng.normal(size=(8, 2)))[0].T
    clean = rng.normal(size=(30, 8, 3, 3))
    strength = rng.normal(size=(30, 2, 3, 3)) * 2.0 + 1.0
    dirty = clean + np.einsum("nkhw,kc->nchw", strength, channel_basis)
    for k, most in ((1, None), (2, 1e-5)):
        cav = CAV(mode="channel", n_directions=k).fit_paired(dirty, clean)
        out = [PClArC.from_cav(cav)(torch.tensor(h, dtype=torch.float32)).numpy() for h in (dirty, clean)]
        residual = np.abs(out[0] - out[1]).max() / np.abs(dirty - clean).max()
        assert residual < most if most else residual > 0.3
    # more directions than the pairs span, and several directions without pairs, are refused
    with pytest.raises(InputError, match="span only"):
        CAV(n_directions=50).fit_paired(dirty[:4].reshape(4, -1), clean[:4].reshape(4, -1))
    with pytest.raises(InputError, match="need paired samples"):
        CAV(n_directions=2).fit(dirty, clean)
    with pytest.raises(InputError, match="number of directions"):
        CAV(n_directions=0).fit_paired(dirty, clean)


def test_rank_one_is_the_old_correction():
    """k = 1 is today's P-ClArC: v the normalised mean paired difference, h' = h − v vᵀ(h − z) in both modes, the
    same fingerprint (so archived spec files still load) and spec; a reactive gate still spares clean rows."""
    import hashlib

    from unhans.export.correction import Correction, load_correction

    rng = np.random.default_rng(1)
    clean = rng.normal(size=(30, 4, 3, 3))
    dirty = clean + rng.normal(size=(4, 3, 3)) * 2.0 + rng.normal(size=(30, 4, 3, 3)) * 0.1
    cav = CAV().fit_paired(dirty, clean)
    v = (dirty - clean).reshape(30, -1).mean(0)
    v /= np.linalg.norm(v)
    z = clean.mean(0)
    assert cav.directions_.shape == (1, 36) and np.allclose(cav.direction_, v, atol=1e-6)
    h = rng.normal(size=(5, 4, 3, 3))
    old = h - (((h - z).reshape(5, -1) @ v)[:, None] * v).reshape(h.shape)
    assert np.allclose(PClArC.from_cav(cav)(torch.tensor(h, dtype=torch.float32)).numpy(), old, atol=1e-5)
    channel = CAV(mode="channel").fit_paired(dirty, clean)
    c = channel.direction_.astype(np.float64)
    old = h - c[None, :, None, None] * np.einsum("nchw,c->nhw", h - z, c)[:, None]
    assert np.allclose(PClArC.from_cav(channel)(torch.tensor(h, dtype=torch.float32)).numpy(), old, atol=1e-5)
    digest = hashlib.sha256()  # the fingerprint as it was computed for a single vector
    for array in (np.float32(cav.direction_), np.float32(cav.clean_mean_), np.float64(cav.detector_weight_), np.float64([cav.detector_bias_])):
        digest.update(np.ascontiguousarray(array).tobytes())
    correction = Correction.from_cav(cav)
    assert cav.fingerprint() == correction.fingerprint() == Correction(cav.direction_, cav.clean_mean_, "flat", cav.detector_weight_,
                                                                       cav.detector_bias_).fingerprint() == digest.hexdigest()[:16]
    spec = io.BytesIO()
    correction.save(spec, "block")
    spec.seek(0)
    loaded, layer = load_correction(spec)
    assert layer == "block" and loaded.directions == 1 and loaded.fingerprint() == correction.fingerprint()
    gated = PClArC.from_cav(cav, reactive=True)
    rows = torch.tensor(np.concatenate([clean[:3], dirty[:3]]), dtype=torch.float32)
    assert gated.gate(rows).tolist() == [0, 0, 0, 1, 1, 1] and torch.equal(gated(rows)[:3], rows[:3])
    with pytest.raises(InputError, match="not orthonormal"):
        Correction(np.ones((2, 36)) / 6.0, cav.clean_mean_)


def _two_conv_model_and_pairs(colour=(1.0, 1.0, 1.0)):
    """A two-conv model on 6x6 inputs and 24 pairs without/with a 3x3 square added (random strength per pair, ``colour``
    per channel): an artifact spanning several directions of the second conv's output."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5)).eval()
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(24, 3, 6, 6)).astype(np.float32)
    dirty = clean.copy()
    dirty[:, :, 1:4, 1:4] += rng.uniform(1, 3, size=(24, 1, 1, 1)).astype(np.float32) * np.float32(colour)[:, None, None]
    return model, dirty, clean


@pytest.mark.parametrize("mode,fold,reactive,dense_max", [("flat", True, False, 256), ("flat", False, True, 256),
                                                          ("channel", True, False, 256), ("channel", False, False, 256),
                                                          ("channel", False, True, 0)])
def test_rank_k_onnx_graph_equals_pytorch(tmp_path, monkeypatch, mode, fold, reactive, dense_max):
    """A rank-3 correction baked into ONNX (folded, inserted, gated, the wide-channel form) equals PyTorch's module;
    the graph's metadata and spec say k, and the spec rebuilds the same correction."""
    from unhans.export import graph
    from unhans.export import onnx as onnx_export
    from unhans.export.correction import load_correction
    from unhans.export.runtime import run_batched, session

    monkeypatch.setattr(graph, "DENSE_CHANNELS_MAX", dense_max)
    model, dirty, clean = _two_conv_model_and_pairs(colour=(1.0, -1.0, 0.5))
    cav = fit_cav(model, "3", dirty, clean, mode=mode, paired=True, n_directions=3)
    correction = Correction.from_cav(cav, reactive=reactive)
    assert correction.directions == 3
    probe = np.concatenate([dirty[:8], clean[:8]])
    report = onnx_export.export_torch(model, "3", correction, probe, tmp_path / "k.onnx", fold=fold)
    assert report.folded == (fold and not reactive)
    images = np.concatenate([dirty, clean])
    logits, *scores = run_batched(session(str(tmp_path / "k.onnx")), images)
    with torch.no_grad():
        expected = pclarc(model, "3", cav, reactive=reactive)(torch.from_numpy(images)).numpy()
        plain = model(torch.from_numpy(images)).numpy()
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.abs(expected - plain).max() > 1e-2 * np.abs(plain).max()  # the correction does something
    assert np.allclose(scores[0], cav.decision_function(activations(model, images, "3")), atol=1e-3)
    metadata = onnx_export.read_metadata(tmp_path / "k.onnx")
    assert metadata["unhans.correction.directions"] == "3" and metadata["unhans.cav.fingerprint"] == cav.fingerprint()
    loaded, layer = load_correction(report.spec_path)
    assert layer == "3" and loaded.directions == 3 and np.array_equal(loaded.direction, correction.direction)


@pytest.mark.parametrize("mode", ["flat", "channel"])
def test_rank_k_correction_is_explained(tmp_path, mode):
    """The explain graph of a model with a rank-3 correction traces and matches zennit (export_explain verifies it)."""
    from unhans.export.explain import export_explain

    model, dirty, clean = _two_conv_model_and_pairs()
    cav = fit_cav(model, "3", dirty, clean, mode=mode, paired=True, n_directions=3)
    report = export_explain(pclarc(model, "3", cav), tmp_path / "k.explain.onnx", probe=np.concatenate([dirty[:4], clean[:4]]),
                            detector=Correction.from_cav(cav))
    assert report.figures["rel_l2_vs_zennit"] < 1e-4 and report.figures["conservation_rel_err"] < 1e-6
