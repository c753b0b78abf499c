"""TorchServe's stock eager image classifier for the MNIST models, as TorchServe's own MNIST example configures it.

The baseline of bench/serving.py: predictions through ``ImageClassifier`` (PIL decode, ToTensor, eager PyTorch) and
explanations through its built-in Captum Integrated Gradients (``VisionHandler.get_insights``, 15 steps).
"""

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class StockMNISTClassifier(ImageClassifier):
    image_processing = transforms.Compose([transforms.ToTensor()])  # unhans models take pixels in [0, 1]
    topk = 3
