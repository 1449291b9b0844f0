"""Training: arguments, model/optimizer setup, data loading, train loop, checkpoints, logging."""
