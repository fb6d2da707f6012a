"""The training side: the loop, its checkpoints, devices, processes, memory pre-flight, losses, metrics."""
