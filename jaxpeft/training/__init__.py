"""Training: the pure steps, the one host loop, optimizer, checkpoints, devices."""
