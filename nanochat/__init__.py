"""nanochat on Ray: a small ChatGPT-like model through its whole life, every stage on Ray."""

__version__ = "0.1.0"
