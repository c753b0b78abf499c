"""A small ResNet-style CNN: a BatchNorm stem, three residual stages, global average pooling, one dense layer.

TorchServe-style model file: exactly one ``nn.Module`` class is defined here. The residual blocks are
torchvision's ``BasicBlock`` so zennit's ``ResNetCanonizer`` recognises them (it merges their BatchNorms and
makes the residual addition an explicit, attributable layer). ``unhans train`` writes a copy with the constants
below set for the data it trained on.
"""

from collections import OrderedDict

from torch import nn
from torchvision.models.resnet import BasicBlock

IN_CHANNELS = 1
IMAGE_SIZE = 28
NUM_CLASSES = 10


def _stage(inplanes: int, planes: int, stride: int) -> BasicBlock:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    return BasicBlock(inplanes, planes, stride=stride, downsample=downsample)


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int = IN_CHANNELS, image_size: int = IMAGE_SIZE, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)),
            ("bn1", nn.BatchNorm2d(16)),
            ("relu1", nn.ReLU()),
            ("layer1", _stage(16, 16, 1)),
            ("layer2", _stage(16, 32, 2)),
            ("layer3", _stage(32, 64, 2)),
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(64, num_classes)),
        ]))

    def forward(self, x):
        return self.classifier(self.features(x))
