"""Serve mixed-task requests from a checkpoint: ``python serve.py --help`` (installed as ``mtl-serve``).

The command line is :mod:`mtl.cli.serve`; the serving itself is :mod:`mtl.serving`.
"""

import sys

from mtl.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
