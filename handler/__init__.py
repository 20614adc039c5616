"""TorchServe handler package: only these files travel inside the model archive."""
