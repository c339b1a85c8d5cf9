"""Model checkpoints built locally (nothing from a model hub), cached and checksummed."""
