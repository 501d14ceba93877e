"""Tiny random checkpoints the tests build: transformers BLIP (`blip`) and CLIP (`clip`)
directories as `save_pretrained` writes them, and vlp model directories (`vlp`)."""
