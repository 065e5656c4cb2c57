"""Training: the loop, checkpoints, and the process-group setup."""
