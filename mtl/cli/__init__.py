"""The command lines, ``train.py`` and ``serve.py`` (installed as ``mtl-train``, ``mtl-serve``)."""
