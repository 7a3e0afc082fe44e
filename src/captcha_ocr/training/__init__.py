"""Training: the epoch loop, checkpoints and the torchrun environment."""
