"""Quantization: reading checkpoints, solvers, packing, the layer-by-layer engine, writing."""
