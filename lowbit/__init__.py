"""lowbit: quantize large language models to 4 bits, shard by shard."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: see quantize/__init__.py

__version__ = "0.1.0"
