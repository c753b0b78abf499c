"""TorchServe's model store for unhans: tracked here is the configuration template, shipped with the package so that
``unhans archive`` and :class:`unhans.torchserve.LocalTorchServe` find it outside a checkout too."""
