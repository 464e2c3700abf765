"""Mechanisms the training loop relies on but users rarely edit: batch arithmetic, launching, run folders,
checkpoints, resuming, the LR schedule, random states, samplers, loggers and preemption."""
