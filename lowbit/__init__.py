"""lowbit: quantize large language models to 4 bits, shard by shard."""

import os

# An OpenMP thread that finishes its share of an op spins, waiting for the next op, before it sleeps.
# libgomp's default of 300,000 spins steals the cores from the working threads on a busy machine (RTN on
# SmolLM2 once took 190 s instead of 18 s), while never spinning (OMP_WAIT_POLICY=PASSIVE) costs a wake-up,
# about 0.1 ms, on every parallel op: a third of a quiet 2-core machine's quantization time is then spent
# in elementwise ops waking threads. 10,000 spins cover the gap between one op and the next (BENCHMARKS.md,
# "OpenMP threads"). Must be set before torch loads libgomp (every lowbit.* import runs this first); a
# user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
