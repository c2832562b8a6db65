"""XLT engine: configuration, data pipeline, training loop, phases, checkpoints, progress."""
