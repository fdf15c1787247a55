"""The one training loop for every task (device, precision, schedule, checkpoints, resume)."""
