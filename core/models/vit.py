"""A small vision transformer for small images: 4x4-pixel patches, a few pre-norm encoder blocks (torchvision's own
``Encoder``: LayerNorm, multi-head self-attention, GELU MLP, residual sums, learned position embeddings), and the
tokens averaged into a linear head (as ResNet's global pooling: every token's relevance reaches the head, so the end
of the encoder is where the audit's latent SpRAy looks). About 2-3 s an epoch on MNIST-5k on 2 cores.

TorchServe-style model file: exactly one ``nn.Module`` class whose defaults build the trained shape, so
``SmallViT()`` followed by ``load_state_dict`` works. ``unhans train`` writes a copy with the constants below
set for the data it trained on.
"""

import torch
from torch import nn
from torchvision.models.vision_transformer import Encoder

IN_CHANNELS = 1
IMAGE_SIZE = 28
NUM_CLASSES = 10


class SmallViT(nn.Module):
    def __init__(self, in_channels: int = IN_CHANNELS, image_size: int = IMAGE_SIZE, num_classes: int = NUM_CLASSES,
                 patch_size: int = 4, hidden: int = 64, blocks: int = 3, heads: int = 4, mlp: int = 128):
        super().__init__()
        if image_size % patch_size:
            patch_size = next(p for p in range(patch_size, 0, -1) if image_size % p == 0)
        self.patches = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        tokens = (image_size // patch_size) ** 2
        self.encoder = Encoder(tokens, blocks, heads, hidden, mlp, dropout=0.0, attention_dropout=0.0)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # (N, tokens, hidden)
        return self.head(self.encoder(tokens).mean(1))
