"""Training: catalogue preparation, training, evaluation and export."""
