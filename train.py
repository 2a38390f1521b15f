"""Train one multi-task model on a device mesh: ``python train.py --help`` (installed as ``mtl-train``).

The command line is :mod:`mtl.cli.train`; the training run it drives is
:mod:`mtl.trainer`, which notebooks and benchmarks call directly.
"""

import sys

from mtl.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
