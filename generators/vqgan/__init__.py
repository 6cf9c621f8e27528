"""The VQGAN backend and the safe loading of taming-transformers checkpoints."""
