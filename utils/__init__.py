"""Mechanisms the training loop relies on but users rarely edit: batch arithmetic, run folders, checkpoints,
random states, samplers, loggers and preemption."""
