"""Ray Train fine-tuning jobs whose checkpoints become new model versions (see the training issue)."""
