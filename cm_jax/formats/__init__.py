"""Readers and writers of other projects' file formats (diffusers, transformers, PyTorch pickles)."""
