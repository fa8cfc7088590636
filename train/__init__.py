"""Training: the Hydra entry point (``python -m train``), DeepSpeed engine, loop, checkpoints, logging."""
