"""LatentWire: can a frozen LLM still do its job when it reads
compressed-then-reconstructed input embeddings instead of its own?"""
__version__ = "0.1.0"
