"""lowbit: quantize large language models to 4 bits, shard by shard."""

import os

# Idle OpenMP threads that spin steal the CPU from the ones working: on a busy machine
# every elementwise op then costs milliseconds (we measured RTN on SmolLM2: 190 s
# spinning, 18 s passive). Must be set before torch is imported (every lowbit.* import
# runs this first); a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
