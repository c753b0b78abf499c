"""Model definitions kept TorchServe-style: a model file with exactly one ``nn.Module`` class plus a state_dict.

The same rule TorchServe's ``BaseHandler`` applies is used everywhere unhans loads a model, so a model that
audits and exports here also serves there unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError

MODEL_FILES = {"vgg": Path(__file__).with_name("vgg.py"), "resnet": Path(__file__).with_name("resnet.py"),
               "vit": Path(__file__).with_name("vit.py")}
SHAPE_CONSTANTS = ("IN_CHANNELS", "IMAGE_SIZE", "NUM_CLASSES")


def write_model_file(architecture: str, path: str | Path, in_channels: int, image_size: int, num_classes: int) -> Path:
    """Copy the ``architecture`` model file to ``path`` with its default shape set, as TorchServe needs it."""
    if architecture not in MODEL_FILES:
        raise InputError("model", f"{architecture!r} is unknown", f"use one of {sorted(MODEL_FILES)}")
    source = MODEL_FILES[architecture].read_text()
    for name, value in zip(SHAPE_CONSTANTS, (in_channels, image_size, num_classes)):
        source, count = re.subn(rf"^{name} = \d+$", f"{name} = {int(value)}", source, flags=re.M)
        assert count == 1, f"{MODEL_FILES[architecture]} must define {name} once"
    path = Path(path)
    path.write_text(source)
    return path


def model_class_from_file(model_file: str | Path) -> type[nn.Module]:
    """The single ``nn.Module`` class defined in ``model_file`` (TorchServe's rule)."""
    model_file = Path(model_file)
    if not model_file.is_file():
        raise InputError(str(model_file), "does not exist", "pass the model file written by 'unhans train' (model.py)")
    # One module per file version: loading the same file twice gives the same class.
    stat = model_file.stat()
    key = f"{model_file.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
    name = f"unhans_model_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, model_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # pickling and torch.fx look a class's module up by name
        spec.loader.exec_module(module)
    classes = [
        member for _, member in inspect.getmembers(module, inspect.isclass)
        if member.__module__ == name and issubclass(member, nn.Module)
    ]
    if len(classes) != 1:
        raise InputError(str(model_file), f"defines {len(classes)} nn.Module classes", "define exactly one, as TorchServe requires")
    return classes[0]


def load_model(model_file: str | Path, weights: str | Path) -> nn.Module:
    """Instantiate the model file's class with its defaults and load the state_dict, in eval mode on CPU."""
    model = model_class_from_file(model_file)()
    weights = Path(weights)
    if not weights.is_file():
        raise InputError(str(weights), "does not exist", "pass the state_dict written by 'unhans train' (weights.pt)")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[1:2] or [str(error)]
        raise InputError(str(weights), f"does not fit {model_file} ({first[0].strip()})", "pass the weights trained with this model file") from None
    return model.eval()
