"""A small VGG-style CNN: four 3x3 convolutions in two max-pooled stages, then two dense layers.

TorchServe-style model file: exactly one ``nn.Module`` class whose defaults build the trained shape, so
``SmallVGG()`` followed by ``load_state_dict`` works. ``unhans train`` writes a copy with the constants below
set for the data it trained on.
"""

from collections import OrderedDict

from torch import nn

IN_CHANNELS = 1
IMAGE_SIZE = 28
NUM_CLASSES = 10


class SmallVGG(nn.Module):
    def __init__(self, in_channels: int = IN_CHANNELS, image_size: int = IMAGE_SIZE, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 32, 3, padding=1)), ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(32, 32, 3, padding=1)), ("relu2", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv3", nn.Conv2d(32, 64, 3, padding=1)), ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(64, 64, 3, padding=1)), ("relu4", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
        ]))
        side = image_size // 4
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(64 * side * side, 128)), ("relu5", nn.ReLU()),
            ("fc2", nn.Linear(128, num_classes)),
        ]))

    def forward(self, x):
        return self.classifier(self.features(x))
