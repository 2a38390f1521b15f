"""mtl: a shared Transformer backbone with per-task heads, in JAX.

One dimension alphabet is used everywhere: in einsum strings, einops patterns,
shape comments and the names of sharding specs.

    B  batch (decode slots)      T  query length           S  key/value length
    D  model width               F  MLP width              V  vocabulary
    N  query heads (N = K*G)     K  key/value heads        G  query heads per kv head
    H  head size                 M  a kv head's query rows (M = T*G)
    L  layers                    J  tasks                  C  classes of a head
    P  rows of a prefill batch

For example ``'BTD,DNH->BTNH'`` projects activations to query heads, and
``act_btd`` names the sharding of a [B, T, D] activation. The logical names
below are the only spelling of an activation's sharding; ``sharding.RULES``
maps them to mesh axes. Parameters carry their own names where they are made
(``w_dnh`` has ``('embed', 'heads', 'head_dim')``).
"""

__version__ = "0.1.0"

# Activations, by their shapes.
act_btd = ("batch", "length", "embed")  # the residual stream
act_btnh = ("batch", "length", "heads", "head_dim")  # queries, attention outputs
act_btkh = ("batch", "length", "kv_heads", "head_dim")  # keys and values of a sequence
act_btf = ("batch", "length", "mlp")  # the MLP's hidden layer
act_btv = ("batch", "length", "vocab")  # language-model logits

# One layer's KV cache (``layers.KVCache``): keys [B, K, H, S] and values [B, K, S, H]; an int8 cache's
# scales [B, K, S].
cache_bkhs = ("batch", "kv_heads", "head_dim", "length")
cache_bksh = ("batch", "kv_heads", "length", "head_dim")
cache_bks = ("batch", "kv_heads", "length")
