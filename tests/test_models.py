"""LRP on the model matrix (unhans.core.models.zoo): canonization read from each model's own trace, conservation
checked in float64 without biases, the explain graph, and models that must be refused rather than explained wrongly.

Random weights (BatchNorm statistics from a noise batch) except EfficientNet-Lite0's real ImageNet ones, at small
inputs: the 224-px figures are bench/models.py's.
"""

import operator

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from zennit.core import BasicHook, Stabilizer
from zennit.rules import ClampMod, Epsilon, NoMod, zero_bias

from unhans.core import attribution
from unhans.core import canonize as canonize_module
from unhans.core.attribution import LRP
from unhans.core.errors import InputError
from unhans.core.layers import activations, global_pooling_layer, insert_after
from unhans.core.models.zoo import CNNS, USER_RESNET_FILE, build, photos
from unhans.export.correction import Correction
from unhans.export.explain import explain_graph
from unhans.export.onnx import read_metadata
from unhans.export.runtime import session

SIZE = {"efficientnet_lite0": 96}  # the real-weights model sees real photos near its size; the others 32 px
# (BatchNorm layers, residual sums, squeeze-excitation gates) each architecture has: canonization must find them all
STRUCTURE = {"resnet18": (20, 8, 0), "resnet50": (53, 16, 0), "vgg16_bn": (13, 0, 0), "mobilenet_v2": (52, 10, 0),
             "mobilenet_v3_small": (34, 6, 9), "efficientnet_b0": (49, 9, 16), "efficientnet_lite0": (49, 9, 0),
             "user_resnet": (4, 1, 0)}


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, name):
    if name not in models:
        models[name] = build(name, num_classes=10)
    return models[name]


@pytest.mark.parametrize("name", CNNS)  # the transformers at tiny sizes: tests/test_transformers.py
def test_canonized_lrp_is_conservative_and_computes_the_same_logits(models, name):
    model = _model(models, name)
    x = torch.from_numpy(photos(3, SIZE.get(name, 32)))
    with LRP(model) as lrp:
        explanation = lrp(x)
    report = lrp.canonization
    assert (len(report.merged_batchnorms), report.sums, len(report.gates)) == STRUCTURE[name]
    assert not report.unmerged_batchnorms
    with torch.no_grad():
        logits = model(x).numpy()
    assert np.abs(explanation.logits - logits).max() <= 1e-4 * max(1.0, np.abs(logits).max())
    assert lrp.conservation.rel_err <= 1e-9, lrp.conservation.describe()
    assert np.isfinite(explanation.relevance).all() and np.abs(explanation.relevance).sum() > 0


@pytest.mark.parametrize("name", [n for n in CNNS if n != "vgg16_bn"])  # VGG-16's 138M weights: bench/models.py
def test_explain_graph_matches_zennit_on_the_matrix(models, name, tmp_path):
    model = _model(models, name)
    probe = photos(3, SIZE.get(name, 32))
    graph = explain_graph(model, probe=probe)  # verified against zennit inside, refused otherwise
    path = tmp_path / "explain.onnx"
    path.write_bytes(graph.SerializeToString())
    metadata = read_metadata(path)
    assert float(metadata["unhans.verify.conservation_rel_err"]) <= 1e-9
    relevance = session(graph.SerializeToString(), cuda=False).run(["relevance"], {"input": probe, "target": np.full(3, -1)})[0]
    with LRP(model) as lrp:
        expected = lrp(torch.from_numpy(probe)).relevance
    error = np.linalg.norm(relevance - expected) / np.linalg.norm(expected)
    assert error <= 1e-4 or float(metadata.get("unhans.verify.rel_l2_vs_zennit64", "inf")) <= 4 * float(
        metadata["unhans.verify.zennit32_rel_l2_vs_zennit64"]), error


def test_keyword_called_blocks_and_functional_layers_are_canonized():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x, drop_rate=None):
            out = torch.nn.functional.silu(self.bn(self.conv(x)))
            return x + out * torch.sigmoid(out.mean((2, 3), keepdim=True))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            for i, block in enumerate(self.blocks):
                x = block(x, drop_rate=0.1 * i)
            return self.head(x.mean((2, 3)))

    model = Net().eval()
    with LRP(model, layers=["blocks.1"]) as lrp:
        explanation = lrp(torch.rand(2, 3, 16, 16))
    assert lrp.canonization.sums == 2 and len(lrp.canonization.gates) == 2 and len(lrp.canonization.merged_batchnorms) == 2
    assert lrp.conservation.rel_err <= 1e-9
    assert explanation.layer_relevance["blocks.1"].shape == (2, 4, 14, 14)


def test_a_miscanonized_model_is_refused(models, monkeypatch):
    model = _model(models, "user_resnet")
    x = torch.from_numpy(photos(2, 32))
    # additions left as they are (what zennit does with a user's block): relevance is duplicated at the residual sum
    monkeypatch.setattr(canonize_module, "_SHAPE_FUNCTIONS", canonize_module._SHAPE_FUNCTIONS | {operator.add})
    with pytest.raises(InputError, match=r"LRP on UserResNet is not conservative: relevance conservation error .*worst layer"):
        LRP(model)(x)
    monkeypatch.undo()
    # a BatchNorm merge that forgot the running mean changes what the model computes
    merge = canonize_module._merge

    def forgetful(linear, bn):
        bn = type(bn)(bn.num_features).eval()
        merge(linear, bn)
    monkeypatch.setattr(canonize_module, "_merge", forgetful)
    with pytest.raises(InputError, match="canonizing UserResNet for LRP changed its logits"):
        LRP(model)(x)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        x = self.conv(x)
        return x.flatten(1) if x.sum() > 0 else -x.flatten(1)


def test_models_lrp_cannot_explain_are_named():
    with pytest.raises(InputError, match="_Untraceable cannot be traced with torch.fx"):
        LRP(_Untraceable())
    norms = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.InstanceNorm2d(4),
                          nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(InputError, match=r"2 operation\(s\) have no LRP rule: 1 \(GroupNorm\); 4 \(InstanceNorm2d\)"):
        LRP(norms)

    class Bilinear(nn.Module):  # two same-shaped factors, no gate: AttnLRP's uniform rule conserves
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 2, 3), nn.Conv2d(3, 2, 3)

        def forward(self, x):
            return (self.a(x) * self.b(x)).flatten(1)
    with LRP(Bilinear()) as lrp:
        lrp(torch.rand(2, 3, 5, 5))
    assert lrp.conservation.rel_err <= 1e-9


def test_audit_cli_refuses_an_unexplainable_model_with_exit_2(tmp_path):
    from unhans.cli import main

    model_file = tmp_path / "model.py"
    model_file.write_text("from torch import nn\n\n\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                          "        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(144, 2))\n\n"
                          "    def forward(self, x):\n        return self.net(x)\n")
    from unhans.core.models import model_class_from_file

    torch.save(model_class_from_file(model_file)().state_dict(), tmp_path / "weights.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", images=rng.random((20, 8, 8), dtype=np.float32), labels=np.arange(20) % 2)
    result = CliRunner().invoke(main, ["audit", "--model", str(model_file), "--weights", str(tmp_path / "weights.pt"),
                                       "--data", str(tmp_path / "data.npz"), "--out", str(tmp_path / "audit")])
    assert result.exit_code == 2, result.output
    assert "no LRP rule: net.1 (GroupNorm)" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "audit" / "audit.json").exists() and not (tmp_path / "audit" / "relevance").exists()


def test_served_relevance_is_the_conservative_lrp_of_the_corrected_model(models, tmp_path):
    """The handler's explainer on a user's model file: the relevance of the model that predicts, correction included."""
    from unhans.handlers.relevance import Explainer

    model = _model(models, "user_resnet")
    served = tmp_path / "served"
    served.mkdir()
    (served / "model.py").write_text(USER_RESNET_FILE.read_text())
    torch.save(model.state_dict(), served / "weights.pt")
    rng = np.random.default_rng(0)
    direction = rng.normal(size=64).astype(np.float32)
    correction = Correction(direction / np.linalg.norm(direction), rng.random((64, 1, 1), dtype=np.float32))
    correction.save(served / "correction.npz", "avgpool")
    x = photos(3, 32)
    explainer = Explainer(str(served))
    logits, relevance, _ = explainer(x)
    with LRP(insert_after(model, "avgpool", correction.module())) as lrp:
        expected = lrp(torch.from_numpy(x))
    assert np.allclose(logits, expected.logits, atol=1e-6) and np.allclose(relevance, expected.relevance, atol=1e-7)
    assert lrp.conservation.rel_err <= 1e-9 and "conservation error" in explainer.conservation


def test_a_correction_goes_after_a_block_called_with_keyword_arguments(models):
    """EfficientNet-Lite calls its blocks as ``block(x, drop_connect_rate=…)``: corrected, explained, conservative."""
    model = _model(models, "efficientnet_lite0")
    x = photos(4, 96)
    layer = "_blocks.10"
    h = activations(model, x, layer)
    rng = np.random.default_rng(0)
    direction = rng.normal(size=h[0].size).astype(np.float32)
    correction = Correction(direction / np.linalg.norm(direction), h.mean(0))
    corrected = insert_after(model, layer, correction.module())
    with torch.no_grad():
        corrected_logits, logits = corrected(torch.from_numpy(x)).numpy(), model(torch.from_numpy(x)).numpy()
    assert 0 < np.abs(corrected_logits - logits).max()  # the projection changes what reaches the head
    assert np.allclose(activations(corrected, x, layer), correction.module()(torch.from_numpy(h)).numpy(), atol=1e-5)
    with LRP(corrected, layers=[layer]) as lrp:
        explanation = lrp(torch.from_numpy(x))
    assert np.allclose(explanation.logits, corrected_logits, atol=1e-4) and lrp.conservation.rel_err <= 1e-9
    assert explanation.layer_relevance[layer].shape == h.shape


class _SignedZPlusOrEpsilon(BasicHook):
    """ZPlusOrEpsilon with zennit's own signed stabiliser in its epsilon branch: the reference for the cheaper one."""

    def __init__(self, stabilizer=1e-6, epsilon=1e-6):
        plus, signed = Stabilizer.ensure(stabilizer), Stabilizer.ensure(epsilon)

        def gradient_mapper(out_grad, outputs):
            positive = outputs[0] + outputs[1]
            found = (positive > 0).to(out_grad.dtype)
            share = out_grad / plus(positive) * found
            return [share, share, out_grad / signed(outputs[2]) * (1 - found)]
        super().__init__(
            input_modifiers=[lambda x: x.clamp(min=0), lambda x: x.clamp(max=0), lambda x: x],
            param_modifiers=[ClampMod(min=0.0), ClampMod(max=0.0, zero_params=zero_bias()), NoMod()],
            output_modifiers=[lambda output: output] * 3, gradient_mapper=gradient_mapper,
            reducer=lambda inputs, gradients: sum(x * g for x, g in zip(inputs, gradients)))


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0", "resnet18"])
def test_the_cheaper_denominators_give_zennits_relevance(models, name, monkeypatch):
    """Expansion convolutions (signed input, ReLU6 output) and residual sums before a ReLU take RectifiedEpsilon, and
    unrectified z+ layers ZPlusOrEpsilon, whose denominators skip zennit's sign test. zennit's Epsilon (Norm, on a
    sum) and its signed stabiliser in their place must give the same relevance: the relevance reaching a zeroed output
    is exactly 0, and an output without positive contributions is never positive."""
    model = _model(models, name)
    x = torch.from_numpy(photos(3, SIZE.get(name, 32)))
    with LRP(model) as lrp:
        cheaper = lrp(x).relevance
        report = lrp.canonization
    assert len(set(report.signed_input) - set(report.unrectified)) + len(report.rectified_sums) >= 8
    assert len(report.unrectified) >= 8
    monkeypatch.setattr(attribution, "RectifiedEpsilon", lambda epsilon: Epsilon(epsilon=epsilon))
    monkeypatch.setattr(attribution, "ZPlusOrEpsilon", _SignedZPlusOrEpsilon)
    with LRP(model) as lrp:
        signed = lrp(x).relevance
    assert np.abs(cheaper - signed).max() <= 1e-6 * np.abs(signed).max()


def test_the_global_pooling_layer_is_found_where_a_model_has_one(models):
    """Where a moving artifact can be corrected (README: which layer to correct): the pooling over every position, not
    a squeeze-excitation's pooling inside a block, and none in a head that keeps positions (VGG's 7x7 avgpool)."""
    probe = torch.from_numpy(photos(2, 64))
    assert global_pooling_layer(_model(models, "resnet18"), probe) == "avgpool"
    assert global_pooling_layer(_model(models, "efficientnet_b0"), probe) == "avgpool"  # its blocks' SE pools run before it
    assert global_pooling_layer(_model(models, "efficientnet_lite0"), probe) == "_avg_pooling"
    assert global_pooling_layer(_model(models, "vgg16_bn"), probe) is None
