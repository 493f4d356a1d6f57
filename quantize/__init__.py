"""Quantization: reading checkpoints, solvers, packing, the layer-by-layer engine, writing."""

import os

# Idle OpenMP threads that spin steal the CPU from the ones working: on a busy machine
# every elementwise op then costs milliseconds (we measured RTN on SmolLM2: 190 s
# spinning, 18 s passive). Must be set before torch is imported; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
