"""Export: bake the P-ClArC correction into ONNX graphs and package them for TorchServe."""
