"""lowbit: quantize large language models to 4 bits, shard by shard."""

__version__ = "0.1.0"
