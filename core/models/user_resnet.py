"""A user's own residual network, as a team would write it (one class, TorchServe-style): the residual addition and a
1×1 projection shortcut live in the model's own ``forward``, so no block class tells a canonizer where they are.
Part of the model matrix (:mod:`unhans.core.models.zoo`) that the tests and ``bench/models.py`` run."""

import torch
from torch import nn

IN_CHANNELS = 3
IMAGE_SIZE = 224
NUM_CLASSES = 10


class UserResNet(nn.Module):
    def __init__(self, in_channels: int = IN_CHANNELS, num_classes: int = NUM_CLASSES, width: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv_a = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(2 * width)
        self.conv_b = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(2 * width)
        self.shortcut = nn.Conv2d(width, 2 * width, 1, stride=2, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(2 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc1 = nn.Linear(2 * width, width)
        self.fc2 = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem_bn(self.stem(x))))
        out = torch.relu(self.bn_a(self.conv_a(x)))
        out = self.bn_b(self.conv_b(out))
        out = torch.relu(out + self.shortcut_bn(self.shortcut(x)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc2(torch.relu(self.fc1(self.dropout(out))))
