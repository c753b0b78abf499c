"""TorchServe handlers that answer with predictions and, when asked, relevance maps of the model that predicted."""
