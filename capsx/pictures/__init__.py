"""Pictures of what models learned: arrays and tensors, no side effects."""
