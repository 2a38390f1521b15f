"""Test set-up: 8 virtual CPU devices, fixed before JAX initialises."""

import os

os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests build many small programs; XLA's CPU autotuning only slows them down.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

# Caches (tokenized data, compiled programs) go to a folder of this test process, never the user's home;
# set before any test module copies os.environ for its subprocesses.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

os.environ["MTL_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtl-test-cache-")
atexit.register(shutil.rmtree, os.environ["MTL_CACHE_DIR"], ignore_errors=True)
