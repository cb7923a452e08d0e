"""Training: state, steps, optimizers, schedules, checkpoints, the loop (train_and_evaluate)."""
