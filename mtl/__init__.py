"""mtl: a shared Transformer backbone with per-task heads, in JAX.

One dimension alphabet is used everywhere: in einsum strings, einops patterns,
shape comments and the names of sharding specs.

    B  batch                 T  query length          S  key/value length
    D  model width           F  MLP width             N  query heads
    K  key/value heads       H  head size             V  vocabulary
    L  layers                C  classes of a head

For example ``'BTD,DNH->BTNH'`` projects activations to query heads, and
``act_btd`` names the sharding of a [B, T, D] activation.
"""

__version__ = "0.1.0"
