"""The fine-tuning engine: methods, packing, checkpoints, the shared loop, the torchrun launcher."""
