"""Test set-up: 8 virtual CPU devices, fixed before JAX initialises."""

import os

os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests build many small programs; XLA's CPU autotuning only slows them down.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
